"""A dynamo capture fixes every size to the example input's but the batch axis: the compressed
model runs on other batch sizes, and the caller's tensors are left as they were."""
import pytest
import torch
from torch import nn

import repshift_fx
from conftest import tiny_timm

pytestmark = pytest.mark.fresh_traces  # capture is the subject here: every compress() traces anew


class _ShapeBranching(nn.Module):
    """Branches on a size in Python: torch.fx cannot trace it, torch._dynamo.export can."""

    def __init__(self):
        super().__init__()
        self.vit = tiny_timm("deit_tiny_patch16_224", depth=4)

    def forward(self, x):
        if x.shape[-1] > 32:
            return self.vit(x)
        return self.vit(nn.functional.interpolate(x, size=64))


def test_dynamo_capture_runs_on_another_batch_size():
    model = _ShapeBranching().eval()
    x = torch.randn(2, 3, 64, 64)
    full = repshift_fx.compress(model, x, keep=1.0, compile=False)
    pruned = repshift_fx.compress(model, x, keep=0.7, at=(1,), compile=False)
    other = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        want = model(other)
        torch.testing.assert_close(full(other), want, rtol=1e-5, atol=1e-5)
        assert pruned(other).shape == want.shape
    assert not hasattr(x, "_dynamo_weak_dynamic_indices")  # the mark is on an alias
