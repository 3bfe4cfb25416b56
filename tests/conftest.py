"""Shared fixtures. `repshift_fx` is imported first: its torchvision guard must precede timm."""
import repshift_fx  # noqa: F401  (before timm)

import importlib.util
import os
import re
from pathlib import Path

import pytest
import timm
import torch
import torch.fx
from hypothesis import HealthCheck, settings

from repshift_fx.capture import reuse_traces

# property-based tests (tests/test_properties.py): "ci", the default, draws few examples, the same on
# every run; `pytest --hypothesis-profile=long` draws many, anew each run
_PROFILE = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
settings.register_profile("ci", max_examples=30, derandomize=True, **_PROFILE)
settings.register_profile("long", max_examples=300, **_PROFILE)
if settings.get_current_profile_name() == "default":  # else pytest's --hypothesis-profile chose one already
    settings.load_profile("ci")

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: one torch thread per worker, or N workers oversubscribe
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # and the scripts the tests run in a subprocess


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Within a test, compressing the same model on inputs of the same shapes again reuses its
    first trace, as calibrate() and the sweeps do (`capture.reuse_traces`; a transformers model's
    dynamo capture is most of a small compress). A test marked `fresh_traces` captures every time."""
    if item.get_closest_marker("fresh_traces"):
        yield
        return
    with reuse_traces():
        yield


def tiny_timm(name: str, depth: int = 4, img_size: int = 64, fused: bool = True, **kwargs):
    """A timm model with few blocks and a small image, random weights, in eval mode."""
    previous = timm.layers.use_fused_attn()
    timm.layers.set_fused_attn(fused)
    try:
        torch.manual_seed(0)
        model = timm.create_model(name, depth=depth, img_size=img_size, **kwargs).eval()
    finally:
        timm.layers.set_fused_attn(previous)
    return model


@pytest.fixture(scope="module")
def vit():
    """A tiny random DeiT classifier (4 blocks, 64 px, 10 classes)."""
    return tiny_timm("deit_tiny_patch16_224", depth=4, img_size=64, num_classes=10)


def random_batches(count: int, size: int, seed: int) -> list[torch.Tensor]:
    """`count` batches of `size` random 64 px images, reproducible by `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 64, 64, generator=generator) for _ in range(count)]


def flat_halves(batch: int, side: int) -> torch.Tensor:
    """Images of two flat colours, left and right: every row of patches is the same."""
    x = torch.zeros(batch, 3, side, side)
    for b in range(batch):
        x[b, b % 3, :, : side // 2], x[b, (b + 1) % 3, :, side // 2:] = 1.0 + b, -1.0
    return x


class PerToken(torch.nn.Module):
    """A timm ViT's normed tokens, every one: a per-token output (a dense head, a bare encoder)."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        return self.vit.forward_features(x)


def last_hidden(out) -> torch.Tensor:
    """A transformers encoder's `last_hidden_state`, from its output object or the graph's tuple."""
    return out["last_hidden_state"] if isinstance(out, dict) else out[0]


def snapshot(model: torch.nn.Module) -> dict:
    """Everything compress() must leave alone: weights, module tree, modes, attributes."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "tensors": {k: v for k, v in model.state_dict().items()},
        "modules": [(n, type(m).__name__, m.training, sorted(vars(m))) for n, m in model.named_modules()],
        "repr": repr(model),
    }


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["repr"] == before["repr"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
        assert after["tensors"][key] is before["tensors"][key] or torch.equal(after["tensors"][key], value)


@pytest.fixture(scope="session")
def deit():
    return tiny_timm("deit_tiny_patch16_224")


@pytest.fixture(scope="session")
def _resnet18_shared():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    return model, snapshot(model)


@pytest.fixture
def resnet18(_resnet18_shared):
    """torchvision resnet18 (seed 0, eval), one for the session. torch.compile marks the module it
    wraps (`_is_torch_compile`): removed after each test, which must leave the model otherwise as it was."""
    model, original = _resnet18_shared
    yield model
    vars(model).pop("_is_torch_compile", None)
    assert_unchanged(model, original)


@pytest.fixture
def image():
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64)


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    """|a - b| at most tol times max |b| (b is the reference)."""
    error = ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
    assert error <= tol, f"relative error {error:.3g} > {tol:g}"


def assert_refused(model, x, error, *substrings, **config) -> str:
    """compress(model, x, **config) raises `error`, a RepShiftError whose message contains every one
    of `substrings`, and leaves the model unchanged. Returns the message."""
    before = snapshot(model)
    with pytest.raises(error) as caught:
        repshift_fx.compress(model, x, compile=False, **config)
    message = str(caught.value)
    assert isinstance(caught.value, repshift_fx.RepShiftError)
    for substring in substrings:
        assert substring in message, (substring, message)
    assert_names_no_node(message)
    assert_unchanged(model, before)
    return message


def assert_names_no_node(message: str) -> None:
    """No node of a captured graph in a user's error: torch.fx's node dump ("While executing
    %getitem_3 ...") or a Proxy."""
    assert "While executing" not in message and "Proxy(" not in message, message
    assert not re.search(r"%\w+", message), message


def node_values(gm: torch.fx.GraphModule, *args) -> dict:
    """Every value the graph computes on args, by node name (an Interpreter that keeps them)."""
    run = torch.fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        run.run(*args)
    return {node.name: value for node, value in run.env.items()}


def assert_compiled_matches_eager(model, shape: tuple, batches: tuple, tol: float = 1e-5, **config) -> None:
    """compress() compiled against compress(compile=False), for inputs of `shape` at each batch size."""
    from repshift_fx.api import COMPILE_KEYWORDS

    torch._dynamo.reset()
    x = torch.randn(batches[0], *shape)
    eager = repshift_fx.compress(model, x, compile=False, **{k: v for k, v in config.items()
                                                            if k not in COMPILE_KEYWORDS})
    compiled = repshift_fx.compress(model, x, **config)
    with torch.no_grad():
        for batch in batches:
            y = torch.randn(batch, *shape)
            assert_close(compiled(y), eager(y), tol)


def load_tool(name: str):
    """A script under tools/ (not a package) as a module: load_tool("bench") -> tools/bench.py."""
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_tool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
