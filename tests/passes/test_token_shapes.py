"""Literal sizes downstream of a drop follow the new token count; unattributable ones refuse."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repshift_fx
from reference import distance, prune
from repshift_fx import UnsupportedSiteError

TOKENS, DIM, HEADS = 17, 32, 4


class LiteralBlock(nn.Module):
    """A pre-norm block whose forward writes the token count as a Python int."""

    def __init__(self, literal: bool):
        super().__init__()
        self.literal = literal
        self.n1, self.n2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def attention(self, x):
        B = x.shape[0]
        N = TOKENS if self.literal else x.shape[1]
        q, k, v = self.qkv(x).reshape(B, N, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, DIM))

    def forward(self, x):
        x = x + self.attention(self.n1(x))
        return x + self.mlp(self.n2(x))


class LiteralViT(nn.Module):
    def __init__(self, literal=True, flatten_head=False, depth=3):
        super().__init__()
        self.flatten_head = flatten_head
        self.patch = nn.Conv2d(3, DIM, 16, 16)
        self.cls = nn.Parameter(torch.randn(1, 1, DIM))
        self.pos = nn.Parameter(torch.randn(1, TOKENS, DIM) * 0.02)
        self.blocks = nn.ModuleList(LiteralBlock(literal) for _ in range(depth))
        self.head = nn.Linear(DIM * (TOKENS if flatten_head else 1), 10)

    def embed(self, img):
        x = self.patch(img).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos

    def forward(self, img):
        x = self.embed(img)
        for block in self.blocks:
            x = block(x)
        if self.flatten_head:
            return self.head(x.reshape(x.shape[0], TOKENS * DIM))
        return self.head(x[:, 0])


@torch.no_grad()
def reference(model, img, at, keep):
    x = model.embed(img)
    for i, block in enumerate(model.blocks):
        block.literal = False
        mid = x + block.attention(block.n1(x))
        branch = block.mlp(block.n2(mid))
        x = mid + branch
        block.literal = True
        if i in at:
            x = prune(x, distance(branch, mid, "l2"), 1, keep)
    return model.head(x[:, 0])


def test_literal_token_counts_follow_the_drop():
    torch.manual_seed(0)
    model = LiteralViT().eval()
    img = torch.randn(3, 3, 64, 64)
    gm = repshift_fx.compress(model, img, keep=0.5, at=(0, 1), compile=False)
    assert gm.report.tokens == [17, 9, 5]
    literals = [n.args for n in gm.graph.nodes if n.op == "call_method" and n.target == "reshape"]
    assert any(9 in args for args in literals) and any(5 in args for args in literals)
    with torch.no_grad():
        torch.testing.assert_close(gm(img), reference(model, img, (0, 1), 0.5))


def test_head_that_flattens_every_token_is_refused_by_name_without_restore():
    model = LiteralViT(flatten_head=True).eval()
    with pytest.raises(UnsupportedSiteError, match="in the model's top-level forward reshapes its 17 tokens.*restore=True"):
        repshift_fx.compress(model, torch.randn(2, 3, 64, 64), keep=0.5, at=(1,), restore=False, compile=False)


def test_head_that_flattens_every_token_reads_them_restored():
    model, img = LiteralViT(flatten_head=True).eval(), torch.randn(2, 3, 64, 64)
    gm = repshift_fx.compress(model, img, keep=0.5, at=(1,), compile=False)
    with torch.no_grad():
        assert gm(img).shape == model(img).shape
    assert gm.report.blocks[-1].restored and gm.report.tokens[-1] < gm.report.tokens[0]
