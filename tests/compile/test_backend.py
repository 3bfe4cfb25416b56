"""torch.compile(model, backend="repshift") and repshift_fx.backend(...): dynamo's graphs pruned as
compress() prunes them, across graph breaks, batch sizes and resolutions."""
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch._dynamo.exc import BackendCompilerFailed
from torch._dynamo.utils import counters

import repshift_fx
from conftest import PerToken, assert_close, assert_unchanged, snapshot, tiny_timm
from repshift_fx import ConfigError, ModelModeError, UnsupportedSiteError

ROOT = Path(__file__).resolve().parents[2]
DIM, HEADS = 32, 4



def _compiled(model, dynamic=None, **config):
    """A fresh dynamo state and `torch.compile(model, backend=repshift_fx.backend(**config))`."""
    torch._dynamo.reset()
    counters.clear()
    config.setdefault("inner", "eager")
    backend = repshift_fx.backend(**config)
    return torch.compile(model, backend=backend, dynamic=dynamic), backend


def _refusal(compiled, x) -> Exception:
    with pytest.raises(BackendCompilerFailed) as caught, torch.no_grad():
        compiled(x)
    return caught.value.inner_exception


class IntBlock(nn.Module):
    """A pre-norm block whose forward writes the token count and widths as Python ints
    (tokens=None: the count read from x.shape)."""

    def __init__(self, tokens):
        super().__init__()
        self.tokens = tokens
        self.n1, self.n2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.fc1, self.fc2 = nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)

    def forward(self, x):
        B, N = x.shape[0], self.tokens or x.shape[1]
        q, k, v = self.qkv(self.n1(x)).reshape(B, N, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, DIM))
        return x + self.fc2(F.gelu(self.fc1(self.n2(x))))


class IntViT(nn.Module):
    """A hand-written ViT: CLS token, Python-int sizes, optionally a head that needs every token."""

    def __init__(self, depth=3, flatten_head=False):
        super().__init__()
        self.flatten_head = flatten_head
        self.patch = nn.Conv2d(3, DIM, 16, 16)
        self.cls = nn.Parameter(torch.randn(1, 1, DIM))
        self.pos = nn.Parameter(torch.randn(1, 17, DIM) * 0.02)
        self.blocks = nn.ModuleList(IntBlock(17) for _ in range(depth))
        self.head = nn.Linear(DIM * (17 if flatten_head else 1), 10)

    def forward(self, img):
        x = self.patch(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(x.reshape(x.shape[0], 17 * DIM) if self.flatten_head else x[:, 0])


class AnyResolutionViT(nn.Module):
    """A ViT without position table: any multiple of 16 px runs, the token count follows."""

    def __init__(self, depth=3):
        super().__init__()
        self.patch = nn.Conv2d(3, DIM, 16, 16)
        self.cls = nn.Parameter(torch.randn(1, 1, DIM))
        self.blocks = nn.ModuleList(IntBlock(None) for _ in range(depth))
        self.head = nn.Linear(DIM, 10)

    def forward(self, img):
        x = self.patch(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.head(x[:, 0])


class BreakingViT(nn.Module):
    """A timm ViT's forward with a graph break: before the blocks, between two blocks, in the loop
    over the blocks, or after the pooling."""

    def __init__(self, vit, where):
        super().__init__()
        self.vit, self.where = vit, where

    def forward(self, img):
        vit = self.vit
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(img)))
        if self.where == "print":
            print("tokens:", x.shape)
        elif self.where == "item" and x.abs().max().item() > 1e9:
            x = x / 2
        if self.where == "between":  # unrolled: dynamo resumes after the print with blocks 2 and 3
            x = vit.blocks[1](vit.blocks[0](x))
            print("after block 1")
            x = vit.blocks[3](vit.blocks[2](x))
        for i, block in enumerate(vit.blocks if self.where != "between" else ()):
            x = block(x)
            if self.where == "loop":  # a break inside the loop: dynamo compiles each block on its own
                print("after block", i)
        if self.where == "head":  # after the pooling: no token leaves the graph of the blocks
            x = vit.norm(x)[:, 0]
            print("pooled:", x.shape)
            return vit.head(x)
        return vit.forward_head(vit.norm(x))


def vit_b_16_two_layers():
    """torchvision's vit_b_16 (widths, heads, patch size) with 2 layers at 64 px."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=12,
                                                 hidden_dim=768, mlp_dim=3072, num_classes=10).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero
    return model


def _model(name):
    torch.manual_seed(0)
    return {"timm": lambda: tiny_timm("deit_tiny_patch16_224"), "torchvision": vit_b_16_two_layers,
            "hand-written": lambda: IntViT().eval()}[name]()


FRESH_PROCESS = """
    import glob, importlib.util, os, sys
    import torch
    # This machine's torchvision wheel does not match its CPU torch (ENVIRONMENT.md): define the two
    # operator schemas repshift_fx's guard would, without importing repshift_fx.
    root = importlib.util.find_spec("torchvision").submodule_search_locations[0]
    try:
        torch.ops.load_library(glob.glob(os.path.join(root, "_C*.so"))[0])
    except (OSError, IndexError):
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            lib.define(op + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import timm
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", depth=4, img_size=64).eval()
    imported_before = "repshift_fx" in sys.modules
    compiled = torch.compile(model, backend="repshift")
    torch.manual_seed(1)
    inputs = {b: torch.randn(b, 3, 64, 64) for b in (1, 2, 7, 32)}
    with torch.no_grad():
        outputs = {b: compiled(x) for b, x in inputs.items()}
    torch.save({"state": model.state_dict(), "inputs": inputs, "outputs": outputs,
                "graphs": counters["stats"]["unique_graphs"], "imported_before": imported_before}, sys.argv[1])
"""


def test_entry_point_in_a_fresh_process_equals_compress(tmp_path):
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(FRESH_PROCESS), str(tmp_path / "run.pt")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    run = torch.load(tmp_path / "run.pt")
    assert not run["imported_before"]
    assert run["graphs"] <= 2  # batch 1 static, then one graph with a dynamic batch
    model = tiny_timm("deit_tiny_patch16_224")
    model.load_state_dict(run["state"])
    reference = repshift_fx.compress(model, run["inputs"][2], score="shift", compile=False)  # the backend's default
    assert reference.report.tokens == [17, 17, 13, 10]
    with torch.no_grad():
        for batch, x in run["inputs"].items():
            assert_close(run["outputs"][batch], reference(x), tol=1e-4)  # Inductor's kernels vs eager


@pytest.mark.parametrize("name,at", [("timm", (1,)), ("torchvision", (1,)), ("torchvision", (0,)),
                                     ("hand-written", (1,)), ("hand-written", (0, 1))])
def test_backend_on_dynamo_graphs_equals_compress(name, at):
    model, x = _model(name), torch.randn(2, 3, 64, 64)
    model._is_torch_compile = True  # torch.compile (not the backend) marks the module it wraps
    before = snapshot(model)
    reference = repshift_fx.compress(model, x, keep=0.5, at=at, compile=False)
    compiled, backend = _compiled(model, keep=0.5, at=at)
    with torch.no_grad():
        assert_close(compiled(x), reference(x))
    assert backend.reports[-1].tokens == reference.report.tokens
    assert backend.reports[-1].prefix == reference.report.prefix == 1
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", ["timm", "hand-written"])
def test_batch_sizes_1_2_7_32_compile_at_most_twice(name):
    model = _model(name)
    reference = repshift_fx.compress(model, torch.randn(2, 3, 64, 64), keep=0.5, at=(1,), compile=False)
    compiled, backend = _compiled(model, keep=0.5, at=(1,))
    with torch.no_grad():
        for batch in (1, 2, 7, 32):
            x = torch.randn(batch, 3, 64, 64)
            assert_close(compiled(x), reference(x))
    assert counters["stats"]["unique_graphs"] <= 2
    assert len(backend.reports) <= 2


@pytest.mark.parametrize("dynamic", [None, True])
def test_other_resolutions_recompile_with_their_own_token_counts(dynamic):
    torch.manual_seed(0)
    model = AnyResolutionViT().eval()
    compiled, backend = _compiled(model, dynamic=dynamic, keep=0.5, at=(1,))
    seen = {}
    with torch.no_grad():
        for batch, size in ((2, 64), (3, 96), (2, 80), (4, 64), (5, 96)):
            x = torch.randn(batch, 3, size, size)
            reference = repshift_fx.compress(model, x, keep=0.5, at=(1,), compile=False)
            assert_close(compiled(x), reference(x))
            seen[size] = reference.report.tokens
    assert seen == {64: [17, 17, 9], 96: [37, 37, 19], 80: [26, 26, 14]}
    assert {tuple(r.tokens) for r in backend.reports} == {tuple(t) for t in seen.values()}


@pytest.mark.parametrize("where", ["print", "item"])
def test_graph_break_before_the_blocks_still_prunes(deit, where):
    x = torch.randn(2, 3, 64, 64)
    reference = repshift_fx.compress(deit, x, keep=0.5, at=(1,), compile=False)
    compiled, backend = _compiled(BreakingViT(deit, where).eval(), keep=0.5, at=(1,))
    with torch.no_grad():
        assert_close(compiled(x), reference(x))
    assert counters["stats"]["unique_graphs"] == 2  # the embedding alone, then the blocks
    (report,) = backend.reports
    assert report.tokens == [17, 17, 9, 9]
    assert report.prefix == 1 and "cls_token" in report.prefix_source  # found in the graph before


def test_graph_break_after_the_pooling_leaves_the_head_alone(deit, caplog):
    x = torch.randn(2, 3, 64, 64)
    reference = repshift_fx.compress(deit, x, keep=0.5, at=(1,), compile=False)
    compiled, backend = _compiled(BreakingViT(deit, "head").eval(), keep=0.5, at=(1,))
    with caplog.at_level(logging.INFO, logger="repshift_fx"), torch.no_grad():
        assert_close(compiled(x), reference(x))
    assert [r.tokens for r in backend.reports] == [[17, 17, 9, 9]]
    assert "no blocks; left as it is" in caplog.text  # the head's graph


def test_tokens_entering_as_an_input_warn_that_no_prefix_is_protected(caplog):
    class TokenEncoder(nn.Module):  # takes (B, N, C) tokens: no CLS, as compress() sees it too
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(IntBlock(None) for _ in range(3))

        def forward(self, tokens):
            for block in self.blocks:
                tokens = block(tokens)
            return tokens.mean(1)

    torch.manual_seed(0)
    model, tokens = TokenEncoder().eval(), torch.randn(2, 16, DIM)
    reference = repshift_fx.compress(model, tokens, keep=0.5, at=(1,), compile=False)
    compiled, backend = _compiled(model, keep=0.5, at=(1,))
    with caplog.at_level(logging.INFO, logger="repshift_fx"), torch.no_grad():
        assert_close(compiled(tokens), reference(tokens))
    assert backend.reports[-1].prefix == reference.report.prefix == 0
    assert "none is protected" in caplog.text and "protect=N" in caplog.text


@pytest.mark.parametrize("amounts", [dict(r=2), dict(r=(2, 2, 1, 1)), dict(r=(3, 1), at=(1, 2))])
def test_tome_in_the_backend_equals_compress(deit, amounts):
    x = torch.randn(2, 3, 64, 64)
    reference = repshift_fx.compress(deit, x, score="tome", compile=False, **amounts)
    compiled, backend = _compiled(deit, score="tome", **amounts)
    with torch.no_grad():
        assert_close(compiled(x), reference(x))
    assert backend.reports[-1].tokens == reference.report.tokens


def test_a_backend_report_says_where_its_dot_graph_is(deit):
    compiled, backend = _compiled(deit, keep=0.5)
    with torch.no_grad():
        compiled(torch.randn(2, 3, 64, 64))
    with pytest.raises(ConfigError, match="repshift_fx.inspect"):
        backend.reports[-1].to_dot()


def test_tome_in_the_backend_maps_at_to_the_blocks_of_each_graph(deit):
    x = torch.randn(2, 3, 64, 64)
    reference = repshift_fx.compress(deit, x, score="tome", r=(3, 2), at=(2, 3), compile=False)
    compiled, backend = _compiled(BreakingViT(deit, "between").eval(), score="tome", r=(3, 2), at=(2, 3))
    with torch.no_grad():
        assert_close(compiled(x), reference(x))
    (report,) = backend.reports  # blocks 2 and 3, after the break, merge; blocks 0 and 1 are left alone
    assert [row.index for row in report.blocks] == [2, 3] and report.tokens == reference.report.tokens[2:]


def test_at_counts_the_model_blocks_when_a_graph_break_splits_them(deit):
    x = torch.randn(2, 3, 64, 64)
    reference = repshift_fx.compress(deit, x, keep=0.5, at=(2,), compile=False)
    compiled, backend = _compiled(BreakingViT(deit, "between").eval(), keep=0.5, at=(2,))
    with torch.no_grad():
        assert_close(compiled(x), reference(x))
    (report,) = backend.reports  # the graph of blocks 0 and 1 has no drop: left alone
    assert [row.index for row in report.blocks] == [2, 3]
    assert report.tokens == [17, 9] and report.config["at"] == (2,)


def test_a_drop_whose_tokens_leave_the_graph_is_refused(deit):
    compiled, _ = _compiled(BreakingViT(deit, "between").eval(), keep=0.5, at=(1,))
    err = _refusal(compiled, torch.randn(2, 3, 64, 64))
    assert isinstance(err, UnsupportedSiteError)
    assert "graph break" in str(err) and "block 1 (vit.blocks.1)" in str(err)


def test_blocks_compiled_one_by_one_are_refused(deit):
    compiled, _ = _compiled(BreakingViT(deit, "loop").eval(), keep=0.5, at=(1,))
    err = _refusal(compiled, torch.randn(2, 3, 64, 64))
    assert isinstance(err, UnsupportedSiteError) and "one block's own forward" in str(err)


def test_literal_that_needs_every_token_is_answered_as_compress_answers_it():
    """A head that flattens every token: the planner puts them back after the last block, under the
    backend as in compress(); with restore=False both refuse, naming the forward and the count."""
    torch.manual_seed(0)
    model, x = IntViT(flatten_head=True).eval(), torch.randn(2, 3, 64, 64)
    compiled, backend = _compiled(model, keep=0.5, at=(1,))
    with torch.no_grad():
        expected = repshift_fx.compress(model, x, keep=0.5, at=(1,), compile=False)(x)
        assert_close(compiled(x), expected)
    assert backend.reports[0].tokens == [17, 17, 9]
    compiled, _ = _compiled(model, keep=0.5, at=(1,), restore=False)
    err = _refusal(compiled, x)
    assert isinstance(err, UnsupportedSiteError) and "in the model's top-level forward" in str(err) and "544" in str(err)


def test_logger_reports_drops_token_counts_and_graphs_left_alone(deit, caplog):
    compiled, _ = _compiled(BreakingViT(deit, "print").eval(), keep=0.5, at=(1,))
    with caplog.at_level(logging.INFO, logger="repshift_fx"), torch.no_grad():
        compiled(torch.randn(2, 3, 64, 64))
    text = caplog.text
    assert "no blocks; left as it is" in text
    assert "block 1 (vit.blocks.1) scores by shift(mlp, l2); keeps 1 + 8 of 17 tokens" in text
    assert "tokens entering blocks 0..3: [17, 17, 9, 9]" in text


def test_keep_one_gives_the_original_outputs(deit):
    compiled, _ = _compiled(deit, keep=1.0, at=(0, 1, 2))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(compiled(x), deit(x))


def test_options_are_checked_at_once():
    with pytest.raises(ConfigError, match="keep"):
        repshift_fx.backend(keep=1.5)
    with pytest.raises(ConfigError, match="not a torch.compile backend"):
        repshift_fx.backend(inner="no-such-backend")
    with pytest.raises(ConfigError, match="prune twice"):
        repshift_fx.backend(inner="repshift")
    with pytest.raises(ConfigError, match="got int 5"):
        repshift_fx.backend(inner=5)
    with pytest.raises(ConfigError, match="called by torch.compile"):  # called by hand on a model
        repshift_fx.backend(inner="eager")(nn.Linear(2, 2), [torch.randn(1, 2)])
    assert "inner='eager'" in repr(repshift_fx.backend(inner="eager"))


def test_at_beyond_the_model_is_refused(deit):
    compiled, _ = _compiled(deit, at=(4,))
    err = _refusal(compiled, torch.randn(2, 3, 64, 64))
    assert isinstance(err, ConfigError) and "4 blocks" in str(err)


def test_training_mode_is_refused():
    model = tiny_timm("deit_tiny_patch16_224", drop_rate=0.1).train()
    compiled, _ = _compiled(model, at=(1,))
    with pytest.raises(BackendCompilerFailed) as caught:
        compiled(torch.randn(2, 3, 64, 64))
    assert isinstance(caught.value.inner_exception, ModelModeError)


def test_example_runs_with_a_tiny_model():
    # --inner eager: the configured backend hands its graphs to eager (the entry point still runs
    # Inductor), one cold Inductor compile instead of three
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "torch_compile_backend.py"), "--tiny",
                             "--inner", "eager"],
                            cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if "max |torch.compile" in line]
    assert len(lines) == 4
    assert all(float(line.rsplit("= ", 1)[1]) < 1e-4 for line in lines)
    assert "keeps 1 + 8 of 17 tokens" in result.stderr  # the repshift_fx logger at INFO


# --- lines mode: CNN graphs prune rows and columns, as compress() does ---


class BreakingResNet(nn.Module):
    """torchvision resnet18 with a graph break (print) before its first stage or between stages."""

    def __init__(self, where):
        super().__init__()
        self.net, self.where = torchvision.models.resnet18().eval(), where

    def forward(self, x):
        net = self.net
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        if self.where == "before":
            print("graph break")
        x = net.layer2(net.layer1(x))
        if self.where == "between":
            print("graph break")
        x = net.layer4(net.layer3(x))
        return net.fc(torch.flatten(net.avgpool(x), 1))


def test_cnn_graph_prunes_rows_and_columns_like_compress(resnet18):
    config = {"keep": 0.5, "at": (1, 4)}
    resnet18._is_torch_compile = True  # torch.compile (not the backend) marks the module it wraps; the fixture
    # removes the mark again after the test
    before = snapshot(resnet18)
    compiled, backend = _compiled(resnet18, **config)
    reference = repshift_fx.compress(resnet18, torch.randn(2, 3, 96, 96), compile=False, **config)  # any batch
    with torch.no_grad():
        for batch in (2, 3, 7):  # the second batch size recompiles with a dynamic batch
            x = torch.randn(batch, 3, 96, 96)
            assert_close(compiled(x), reference(x), tol=0)
    assert len(backend.reports) == 2 and backend.reports[0].config["mode"] == "lines"
    assert_unchanged(resnet18, before)
    assert [row.grid_out for row in backend.reports[0].blocks][:5] == [(24, 24), (12, 12), (6, 6), (6, 6), (2, 2)]


def test_cnn_under_inductor_matches_eager_and_keep_one_is_the_model(resnet18):
    x = torch.randn(2, 3, 96, 96)
    compiled, _ = _compiled(resnet18, keep=0.6, at=(2,), inner="inductor")
    with torch.no_grad():
        assert_close(compiled(x), repshift_fx.compress(resnet18, x, keep=0.6, at=(2,), compile=False)(x), tol=1e-4)
        compiled, backend = _compiled(resnet18, keep=1.0, at=(0, 3, 6))
        assert_close(compiled(x), resnet18(x), tol=0)
    assert [row.kept for row in backend.reports[0].blocks if row.scored] == [(24, 24), (12, 12), (3, 3)]


def test_cnn_graph_break_before_the_blocks_still_prunes():
    model = BreakingResNet("before")
    x = torch.randn(2, 3, 96, 96)
    compiled, backend = _compiled(model, keep=0.5, at=(1,))
    with torch.no_grad():
        assert_close(compiled(x), repshift_fx.compress(model.net, x, keep=0.5, at=(1,), compile=False)(x), tol=0)
    (report,) = backend.reports
    assert len(report.blocks) == 8


def test_cnn_blocks_split_by_a_graph_break_are_refused():
    compiled, _ = _compiled(BreakingResNet("between"), keep=0.5, at=(1,))
    err = _refusal(compiled, torch.randn(2, 3, 96, 96))
    assert isinstance(err, UnsupportedSiteError) and "more than one graph" in str(err) and "layer2.1" in str(err)


def test_mode_tokens_leaves_a_cnn_alone_and_mode_lines_a_vit(resnet18, deit, caplog):
    x = torch.randn(2, 3, 96, 96)
    with caplog.at_level(logging.INFO, logger="repshift_fx"), torch.no_grad():
        compiled, backend = _compiled(resnet18, mode="tokens")
        assert_close(compiled(x), resnet18(x), tol=0)
        compiled, backend_lines = _compiled(deit, mode="lines")
        y = torch.randn(2, 3, 64, 64)
        assert_close(compiled(y), deit(y), tol=0)
    assert backend.reports == [] == backend_lines.reports
    assert caplog.text.count("no blocks; left as it is") >= 2


@pytest.mark.parametrize("reduce", ("drop", "merge"))
def test_a_per_token_output_gets_its_tokens_back_in_the_backend(deit, reduce):
    model, x = PerToken(deit).eval(), torch.randn(2, 3, 64, 64)
    reference = repshift_fx.compress(model, x, keep=0.5, at=(1,), reduce=reduce, compile=False)
    compiled, backend = _compiled(model, keep=0.5, at=(1,), reduce=reduce)
    with torch.no_grad():
        assert_close(compiled(x), reference(x))
    assert backend.reports[-1].tokens == [17, 17, 9, 9] and backend.reports[-1].blocks[-1].restored
    compiled, _ = _compiled(model, keep=0.5, at=(1,), restore=False)
    assert "restore=True" in str(_refusal(compiled, x))


def test_windowed_stages_get_mlp_only_drops_in_the_backend():
    """Swin's windows need every token between its MLPs: as in compress(), the drop becomes
    MLP-only (passes/mlp_only_drops.py) and the backend's output equals compress()'s."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", img_size=112, depths=(2, 2), num_heads=(2, 4),
                              embed_dim=32, num_classes=10).eval()
    x = torch.randn(2, 3, 112, 112)
    reference = repshift_fx.compress(model, x, keep=0.5, at=(0,), compile=False)
    compiled, backend = _compiled(model, keep=0.5, at=(0,))
    with torch.no_grad():
        assert_close(compiled(x), reference(x))
    assert [row.mlp_tokens for row in backend.reports[-1].blocks][:2] == [None, 392]
