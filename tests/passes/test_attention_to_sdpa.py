"""The SDPA rewrite: every explicit form becomes one SDPA node with the same value; others stay."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repshift_fx
from conftest import tiny_timm
from repshift_fx.capture import capture
from repshift_fx.config import Config
from repshift_fx.context import PassContext
from repshift_fx.passes import attention_to_sdpa


class Attention(nn.Module):
    """Hand-written attention in one of several equivalent forms."""

    def __init__(self, form: str, dim: int = 32, heads: int = 4):
        super().__init__()
        self.form, self.heads = form, heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(0.1)
        self.scale = (dim // heads) ** -0.5

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        form = self.form
        if form == "scale_q":
            attn = (q * self.scale) @ k.transpose(-2, -1)
        elif form == "div_scores":
            attn = torch.matmul(q, k.transpose(2, 3)) / (C // self.heads) ** 0.5
        elif form == "bmm":
            q, k, v = (t.reshape(B * self.heads, N, -1) for t in (q, k, v))
            attn = torch.bmm(q, k.mT) * self.scale
        else:
            attn = self.scale * (q @ k.transpose(-1, -2))
        if form == "mask":
            attn = attn + self.bias
        attn = F.softmax(attn, dim=-1) if form != "scale_q" else attn.softmax(-1)
        if form in ("dropout_module", "mask"):
            attn = self.drop(attn)
        elif form == "dropout_fn":
            attn = F.dropout(attn, 0.1, training=self.training)
        out = torch.bmm(attn, v) if form == "bmm" else attn @ v
        if form == "returns_map":
            return self.proj(out.transpose(1, 2).reshape(B, N, C)), attn
        return self.proj(out.reshape(B, self.heads, N, -1).transpose(1, 2).reshape(B, N, C))


FORMS = ["scale_scores", "scale_q", "div_scores", "bmm", "dropout_module", "dropout_fn", "mask"]


def _rewrite(model, x):
    gm, args = capture(model, x)
    ctx = PassContext(Config(), args)
    return attention_to_sdpa.run(gm, ctx), ctx


@pytest.mark.parametrize("form", FORMS)
def test_explicit_forms_become_sdpa_with_the_same_value(form):
    torch.manual_seed(0)
    model = Attention(form).eval()
    model.bias = torch.randn(1, 1, 10, 10)
    x = torch.randn(2, 10, 32)
    gm, ctx = _rewrite(model, x)
    names = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert F.scaled_dot_product_attention in names
    assert not any("softmax" in str(n.target) for n in gm.graph.nodes)
    assert [r.impl for r in ctx.tokens.attention] == ["explicit -> sdpa"]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)


def test_attention_map_that_is_returned_stays_explicit_with_a_reason():
    model = Attention("returns_map").eval()
    x = torch.randn(2, 10, 32)
    gm, ctx = _rewrite(model, x)
    (record,) = ctx.tokens.attention
    assert record.impl == "explicit" and "also read by" in record.reason
    with torch.no_grad():
        torch.testing.assert_close(gm(x)[0], model(x)[0])


def test_softmax_over_another_axis_stays_explicit():
    class NotAttention(nn.Module):
        def forward(self, x):
            return (x @ x.transpose(-2, -1)).softmax(dim=1) @ x

    gm, ctx = _rewrite(NotAttention().eval(), torch.randn(2, 5, 8))
    assert ctx.tokens.attention[0].impl == "explicit" and "last axis" in ctx.tokens.attention[0].reason


def test_timm_explicit_attention_rewritten_and_equal():
    model = tiny_timm("deit_tiny_patch16_224", fused=False)
    x = torch.randn(2, 3, 64, 64)
    report = repshift_fx.inspect(model, x, keep=1.0, at=(0,))
    assert {r.attention for r in report.blocks} == {"explicit -> SDPA"}
    gm = repshift_fx.compress(model, x, keep=1.0, at=(0,), compile=False)
    with torch.no_grad():
        out, ref = gm(x), model(x)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_sdpa_false_keeps_explicit_attention():
    model = tiny_timm("deit_tiny_patch16_224", fused=False)
    report = repshift_fx.inspect(model, torch.randn(1, 3, 64, 64), sdpa=False, at=(1,))
    assert all(r.attention.startswith("explicit (kept)") for r in report.blocks)
