"""Capture computes what the model computes: in-place calls are neither folded away as pass-throughs
nor removed as dead code, and `check_capture` names the first module whose output a wrong graph misses."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repshift_fx
import timm
from conftest import assert_close, tiny_timm
from repshift_fx import CaptureError
from repshift_fx.capture import capture, check_capture

pytestmark = pytest.mark.fresh_traces  # capture is the subject here: every compress() traces anew


@pytest.mark.parametrize("name,kwargs", [
    # ResNet stem: GroupNormAct's F.relu(x, inplace=True) returns x (changed); it was folded away as a no-op
    ("vit_tiny_r_s16_p8_224", {}),
    # NaFlexEmbeds adds its position embedding by x.add_(pos): dynamo export's DCE dropped the call
    ("naflexvit_base_patch16_gap", {"embed_dim": 64, "num_heads": 2}),
])
@pytest.mark.parametrize("sdpa", (False, True))
def test_keep_one_computes_what_the_model_computes(name, kwargs, sdpa):
    model = tiny_timm(name, depth=2, img_size=64, **kwargs)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    gm = repshift_fx.compress(model, x, keep=1.0, at=(0,), sdpa=sdpa, compile=False)
    with torch.no_grad():
        assert_close(gm(x), model(x))


@pytest.mark.parametrize("name,kwargs", [("vit_tiny_r_s16_p8_224", {}),
                                         ("naflexvit_base_patch16_gap", {"embed_dim": 64, "num_heads": 2})])
def test_the_same_models_prune(name, kwargs):
    model = tiny_timm(name, depth=4, img_size=64, **kwargs)
    x = torch.randn(2, 3, 64, 64)
    gm = repshift_fx.compress(model, x, keep=0.5, at=(1,), compile=False)
    assert gm.report.tokens[2] < gm.report.tokens[1]
    with torch.no_grad():
        assert gm(x).shape == model(x).shape


class InPlace(nn.Module):
    """x.add_(pos) whose result nothing reads, and F.relu(x, inplace=True) that returns x itself."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.pos = nn.Parameter(torch.randn(1, 4, 8))

    def forward(self, x):
        x = self.proj(x)
        x.add_(self.pos)
        return F.relu(x, inplace=True) * 2


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = InPlace()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.embed(x))


def test_in_place_calls_survive_capture():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 4, 8)
    gm, _ = capture(model, x)
    with torch.no_grad():
        assert_close(gm(x), model(x))
    assert any(n.target == "add_" for n in gm.graph.nodes)


def test_a_wrong_graph_is_a_capture_error_naming_the_first_module():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 4, 8)
    gm, args = capture(model, x)
    add_ = next(n for n in gm.graph.nodes if n.target == "add_")
    gm.graph.erase_node(add_)  # what dynamo's dead-code elimination did to NaFlexVit
    gm.recompile()
    with pytest.raises(CaptureError, match=r"first differing: module 'embed' \(InPlace\)"):
        check_capture(gm, model, args)


def test_check_capture_passes_on_a_faithful_graph(deit, image):
    gm, args = capture(deit, image)
    check_capture(gm, deit, args, rtol=0.0)  # the same ops in the same order: equal to float32 rounding


class _CachesItsBias(nn.Module):
    """Caches a table in a dict under str(x.device), as timm's LeViT and EfficientFormerV2 do with
    their attention biases: tracing must not leave its Proxy in the cache."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.bias = nn.Parameter(torch.randn(5, 8))
        self.cache = {}

    def forward(self, x):
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.bias * 2
        x = x + self.cache[key]
        return x + self.fc2(torch.relu(self.fc1(x)))


def test_a_trace_leaves_no_proxy_in_the_models_own_caches():
    model, x = _CachesItsBias().eval(), torch.randn(2, 5, 8)
    for _ in range(2):  # the second trace would read the first's Proxy from the cache
        gm = repshift_fx.compress(model, x, keep=1.0, at=(0,), compile=False)
        torch.testing.assert_close(gm(x), model(x))
    assert list(model.cache) == ["cpu"] and isinstance(model.cache["cpu"], torch.Tensor)


def test_levit_prunes_after_its_bias_cache_is_filled():
    model = timm.create_model("levit_128s", img_size=96).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        want = model(x)
        repshift_fx.inspect(model, x, keep=0.7)
        assert repshift_fx.inspect(model, x, keep=0.7).flop_ratio < 0.95
        torch.testing.assert_close(repshift_fx.compress(model, x, keep=1.0, compile=False)(x), want)


class _RandomMask(nn.Module):
    """Drops a random half of its tokens on every call, as ViTMAE's random masking does."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        x = x + self.fc2(torch.relu(self.fc1(x)))
        keep = torch.rand(x.shape[0], x.shape[1]).argsort(dim=1)[:, : x.shape[1] // 2]
        return torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[2]))


def test_a_model_that_is_random_on_each_call_is_told_so():
    model = _RandomMask().eval()
    with pytest.raises(CaptureError, match="another output each time .* deterministic"):
        repshift_fx.compress(model, torch.randn(2, 6, 8), keep=1.0, at=(0,), compile=False)
