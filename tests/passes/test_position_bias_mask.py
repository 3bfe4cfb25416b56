"""A position bias built from the sizes alone, combined with the padding mask before the attention
(T5: `where(mask, position_bias, min)`): both are cut to the kept tokens, checked against an eager
reference, and the real T5 encoder prunes, exact at keep=1.0."""
import math

import torch
import torch.nn.functional as F
from torch import nn

import repshift_fx
from conftest import assert_close

DIM, HEADS, N = 16, 2, 12


class BiasedAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.distance = nn.Embedding(2 * N, HEADS)

    def bias(self, n: int) -> torch.Tensor:
        """(1, HEADS, n, n) from the relative positions: no batch axis, sized by the tokens alone."""
        position = torch.arange(n)
        return self.distance(position[None, :] - position[:, None] + N).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x, mask, bias):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        combined = torch.where(mask[:, None, None, :].bool().expand(b, 1, n, n), bias, torch.finfo(x.dtype).min)
        return self.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=combined).transpose(1, 2).reshape(b, n, DIM))


class Encoder(nn.Module):
    def __init__(self, depth: int = 3):
        super().__init__()
        self.embed = nn.Embedding(50, DIM)
        self.attn = nn.ModuleList(BiasedAttention() for _ in range(depth))
        self.mlp = nn.ModuleList(nn.Sequential(nn.LayerNorm(DIM), nn.Linear(DIM, DIM), nn.GELU()) for _ in range(depth))
        self.norm = nn.ModuleList(nn.LayerNorm(DIM) for _ in range(depth))
        self.head = nn.Linear(DIM, 4)

    def forward(self, ids, mask):
        x = self.embed(ids)
        bias = self.attn[0].bias(ids.shape[1])  # computed once, as T5 does, and reused by every block
        for attn, norm, mlp in zip(self.attn, self.norm, self.mlp):
            x = x + attn(norm(x), mask, bias)
            x = x + mlp(x)
        return self.head(x[:, 0])


def reference(model: Encoder, ids, mask, keep: float) -> torch.Tensor:
    """Drop after block 0: padding first, then the lowest MLP shift; blocks 1 on run on the kept tokens,
    its bias and mask cut to them (each token keeps its own position)."""
    x = model.embed(ids)
    bias = model.attn[0].bias(ids.shape[1]).expand(ids.shape[0], -1, -1, -1)
    for i, (attn, norm, mlp) in enumerate(zip(model.attn, model.norm, model.mlp)):
        x = x + attn(norm(x), mask, bias)
        branch = mlp(x)
        shift = (branch - x).norm(dim=-1).masked_fill(mask == 0, float("-inf"))
        x = x + branch
        if i == 0:  # the head reads token 0: it is kept, and `keep` of the others
            best = shift[:, 1:].topk(math.ceil(keep * (x.shape[1] - 1)), dim=1).indices.sort(dim=1).values + 1
            index = torch.cat([torch.zeros_like(best[:, :1]), best], dim=1)
            count = index.shape[1]
            x = x.gather(1, index[..., None].expand(-1, -1, DIM))
            mask = mask.gather(1, index)
            rows = bias.gather(2, index[:, None, :, None].expand(-1, HEADS, -1, bias.shape[3]))
            bias = rows.gather(3, index[:, None, None, :].expand(-1, HEADS, count, -1))
    return model.head(x[:, 0])


def test_the_bias_and_the_mask_are_cut_together():
    torch.manual_seed(0)
    model = Encoder().eval()
    ids = torch.randint(0, 50, (2, N))
    mask = torch.ones(2, N, dtype=torch.long)
    mask[1, -3:] = 0  # three padded positions: they leave first
    compressed = repshift_fx.compress(model, (ids, mask), keep=0.75, at=(0,), compile=False)
    with torch.no_grad():
        assert_close(compressed(ids, mask), reference(model, ids, mask, 0.75))


def test_the_t5_encoder_prunes_with_its_position_bias():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=4, num_heads=4)
    model = T5EncoderModel(config).eval()
    inputs = {"input_ids": torch.randint(0, 64, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    inputs["attention_mask"][1, -4:] = 0
    with torch.no_grad():
        want = model(**inputs).last_hidden_state
        got = repshift_fx.compress(model, inputs, keep=1.0, compile=False)(**inputs)
    assert_close(got.last_hidden_state if hasattr(got, "last_hidden_state") else got[0], want)
    report = repshift_fx.inspect(model, inputs, keep=0.7)
    assert report.flop_ratio < 0.9 and not report.refused
