"""A Vision Mamba (repshift_fx.apps.models.vim; examples/vim.py runs it): SSM blocks with no MLP, the class
token in the middle."""
import math

import pytest
import torch
from torch import nn

import repshift_fx
import vim as example  # examples/vim.py (examples/ is on the tests' pythonpath: pyproject.toml)
from conftest import assert_close
from repshift_fx.apps.models import vim
from repshift_fx.errors import TraceError, UnsupportedSiteError

MIDDLE = 8  # the class token's position among the 17 tokens of a 32 px image in 8 px patches


def tiny_vim(depth=4, **overrides):
    torch.manual_seed(0)
    return vim.VisionMamba(size=32, patch=8, dim=32, depth=depth, d_state=8, classes=5, **overrides).eval()


def images(batch=3):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def reference_forward(model, img, at, keep, site="block"):
    """Score, keep the class token and the best others in order, per sample, by hand."""
    x = model.embed(img)
    origin = torch.arange(x.shape[1]).expand(x.shape[0], -1)
    for i, layer in enumerate(model.layers):
        branch = layer.mixer(layer.norm(x))
        out = x + branch
        if i not in at:
            x = out
            continue
        scores = branch.norm(dim=-1) if site == "block" else (branch - x).norm(dim=-1)
        rows, origins = [], []
        for b in range(x.shape[0]):
            cls = int((origin[b] == model.token_position).nonzero())
            others = [j for j in scores[b].argsort(descending=True).tolist() if j != cls]
            kept = sorted(others[:math.ceil(round(keep * len(others), 9))] + [cls])
            rows.append(out[b, kept])
            origins.append(origin[b, kept])
        x, origin = torch.stack(rows), torch.stack(origins)
    x = model.norm_f(x)
    cls = (origin == model.token_position).int().argmax(1)
    return model.head(x[torch.arange(x.shape[0]), cls])


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_parallel_scan_equals_the_recurrence(dtype, tol):
    g = torch.Generator().manual_seed(0)
    batch, length, d, n = 2, 197, 6, 4

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    u, dt = rand(batch, length, d), torch.nn.functional.softplus(rand(batch, length, d))
    A, B, C, D = -torch.exp(rand(d, n)), rand(batch, length, n), rand(batch, length, n), rand(d)
    expected = vim.sequential_scan(u, dt, A, B, C, D)
    got = vim.selective_scan(u, dt, A, B, C, D)
    assert torch.isfinite(got).all()  # sum(dt A) reaches far below log(float32 max): nothing overflowed
    assert (got - expected).abs().max() <= tol * expected.abs().max()


def test_keep_one_is_the_model():
    model, img = tiny_vim(), images()
    gm = repshift_fx.compress(model, img, keep=1.0, at=(0, 1, 2), compile=False)
    with torch.no_grad():
        assert_close(gm(img), model(img), tol=1e-5)


@pytest.mark.parametrize("site", ["block", "attn"])
def test_agrees_with_an_eager_reference(site):
    model, img = tiny_vim(), images()
    gm = repshift_fx.compress(model, img, keep=0.7, at=(0, 1, 2), site=site, compile=False)
    with torch.no_grad():
        assert_close(gm(img), reference_forward(model, img, (0, 1, 2), 0.7, site), tol=1e-4)
    assert gm.report.tokens == [17, 13, 10, 8]


def test_class_token_is_protected_by_its_read_and_followed():
    model, img = tiny_vim(), images(4)
    gm = repshift_fx.compress(model, img, keep=0.5, at=(0, 1), compile=False)
    report = gm.report
    assert report.prefix == 0  # protected in place, not as a prefix of 9 tokens
    assert any(f"position {MIDDLE}" in note for note in report.notes)
    run = torch.fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        out = run.run(img)
    assert out.shape == (4, 5)
    origin = {n.name: v for n, v in run.env.items() if n.name.startswith("repshift_origin_")}
    last = origin["repshift_origin_1"]
    assert (last == MIDDLE).sum(1).tolist() == [1] * 4  # kept once by every sample...
    where = (last == MIDDLE).int().argmax(1)
    assert len(set(where.tolist())) > 1  # ...at a place of its own in each: the head's read follows it
    assert (last.diff(dim=1) > 0).all()  # the order of the tokens is kept


def test_site_mlp_scores_an_ssm_block_at_its_mixer():
    model, img = tiny_vim(), images()
    default = repshift_fx.compress(model, img, keep=0.7, at=(1,), compile=False)
    mixer = repshift_fx.compress(model, img, keep=0.7, at=(1,), site="attn", compile=False)
    block = repshift_fx.compress(model, img, keep=0.7, at=(1,), site="block", compile=False)
    with torch.no_grad():
        assert_close(default(img), mixer(img), tol=0)
        assert (default(img) - block(img)).abs().max() > 1e-4  # the two sites choose other tokens here


def test_report_says_ssm():
    report = repshift_fx.inspect(tiny_vim(), images(), keep=0.7)
    assert [row.mixer for row in report.blocks] == ["ssm"] * 4
    assert all(row.site == "SSM" for row in report.blocks)
    assert " SSM " in report.table()
    assert report.flop_ratio < 1


def test_merge_keeps_the_order_and_the_class_token():
    model, img = tiny_vim(), images()
    gm = repshift_fx.compress(model, img, keep=0.7, at=(0, 1), reduce="merge", compile=False)
    with torch.no_grad():
        out = gm(img)
    assert out.shape == (3, 5) and torch.isfinite(out).all()


def test_compiled_equals_eager():
    model, img = tiny_vim(depth=2), images(2)
    gm = repshift_fx.compress(model, img, keep=0.7, at=(0,), compile=False)
    compiled = torch.compile(gm)
    with torch.no_grad():
        assert_close(compiled(img), gm(img), tol=1e-4)


def untraceable_scan(u, dt, A, B, C, D):
    if (dt > 0).all():  # data-dependent Python control flow: neither torch.fx nor dynamo can capture it
        return vim.selective_scan(u, dt, A, B, C, D)
    return u


def test_untraceable_scan_is_a_trace_error_naming_the_module():
    with pytest.raises(TraceError, match=r"layers\.0\.mixer\.forward_scan"):
        repshift_fx.compress(tiny_vim(depth=2, scan=untraceable_scan), images(), compile=False)


class ContextVim(vim.VisionMamba):
    """A variant that computes one tensor over all tokens before the blocks and feeds it to each
    block: by a product (gathered with the kept tokens) or joined along the channels (refused)."""

    def __init__(self, join: bool):
        torch.manual_seed(0)
        super().__init__(size=32, patch=8, dim=32, depth=3, d_state=8, classes=5)
        self.join = join
        self.context_proj = nn.Linear(32, 32)
        self.context_mix = nn.Linear(64, 32)

    def forward(self, img):
        x = self.embed(img)
        context = self.context_proj(x)
        for layer in self.layers:
            mixed = self.context_mix(torch.cat([x, context], -1)) if self.join else x * torch.sigmoid(context)
            x = x + layer.mixer(layer.norm(mixed))
        return self.head(self.norm_f(x)[:, self.token_position])


def test_precomputed_full_length_tensor_is_gathered_in_a_product():
    model, img = ContextVim(join=False).eval(), images()
    gm = repshift_fx.compress(model, img, keep=0.7, at=(0,), compile=False)
    assert gm.report.side_tensors == ["the output of module 'context_proj'"]
    keep_one = repshift_fx.compress(model, img, keep=1.0, at=(0,), compile=False)
    with torch.no_grad():
        assert_close(keep_one(img), model(img), tol=1e-5)


def test_precomputed_full_length_tensor_joined_after_a_drop_is_refused():
    model, img = ContextVim(join=True).eval(), images()
    joined = r"'context_proj' \(\d+, 17, 32\).*all 17 tokens.*block 0.*13 tokens"
    with pytest.raises(UnsupportedSiteError, match=joined) as refused:
        repshift_fx.compress(model, img, keep=0.7, at=(0,), compile=False)
    assert refused.value.module == "" and "repshift" not in str(refused.value)


def test_example_runs_with_tiny_settings(capsys):
    found = example.main(["--size", "32", "--patch", "8", "--depth", "2", "--dim", "32", "--batch", "2", "--runs", "1"])
    assert "SSM" in capsys.readouterr().out
    assert found["report"].tokens == [17, 13]
    assert found["scan_gflops"][1] < found["scan_gflops"][0]
