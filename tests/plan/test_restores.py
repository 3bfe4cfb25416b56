"""The planner decides restores from what the analysis found needs every token, before the one rewrite
(passes/find_token_needs.py, repshift_fx/plan/restores.py)."""
import pytest
import torch
from torch import nn
from torch.testing import assert_close

import repshift_fx
from repshift_fx.capture import reuse_traces
from repshift_fx.config import Config
from repshift_fx.errors import UnsupportedSiteError
from repshift_fx.passes import find_token_needs
from repshift_fx.pipeline import rewrite
from reference import reference_forward


class EveryToken(nn.Module):
    """A ViT that returns every token after its final norm (a per-token output, as BertModel's)."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        return self.vit.forward_features(x)


@pytest.fixture
def probes(monkeypatch) -> list:
    """The blocks each probe started from, in order."""
    started = []
    original = find_token_needs.TokenNeeds._probe

    def counting(self, block, drops):
        started.append(block)
        return original(self, block, drops)

    monkeypatch.setattr(find_token_needs.TokenNeeds, "_probe", counting)
    return started


def test_a_per_token_output_gets_a_restore_after_the_last_block_from_one_probe(vit, probes):
    model, x = EveryToken(vit).eval(), torch.randn(2, 3, 64, 64)
    gm, ctx = rewrite(model, x, Config(keep=0.5, at=(0, 2)))
    assert ctx.plan.restore_after == {3} and ctx.plan.restore_at[0][0] == 3
    assert probes == [0]  # the drop at 2 reaches the same output: one probe answers for both
    need = ctx.analysis.needs.first_after(2, (2,))
    assert need.restore_after == 3 and "changes shape" in need.refusal.message
    with torch.no_grad():
        assert gm(x).shape == model(x).shape


def test_a_classifier_needs_nothing_and_the_probes_are_remembered_with_the_trace(vit, probes):
    x = torch.randn(2, 3, 64, 64)
    with reuse_traces():
        for keep in (0.9, 0.7, 0.5):
            _, ctx = rewrite(vit, x, Config(keep=keep, at=(0, 2)))
            assert ctx.plan.restore_at == [] and ctx.analysis.needs.first_after(0, (0, 2)) is None
    assert probes == [0]


def test_the_planner_refuses_with_the_plan_attached_when_restore_is_off(vit, probes):
    with pytest.raises(UnsupportedSiteError) as caught:
        rewrite(EveryToken(vit).eval(), torch.randn(2, 3, 64, 64), Config(keep=0.5, at=(1,), restore=False))
    assert caught.value.plan is not None and caught.value.plan.at == (1,) and caught.value.plan.restore_at == []
    assert caught.value.needs_every_token


def test_the_restored_graph_equals_the_eager_reference(vit):
    """Dropping at block 1 and putting every token back after the last block: the classifier's CLS
    output is the eager reference's (tests/reference.py), and the per-token output keeps its shape."""
    x = torch.randn(2, 3, 64, 64)
    pruned = repshift_fx.compress(EveryToken(vit).eval(), x, keep=0.5, at=(1,), compile=False)
    with torch.no_grad():
        tokens = pruned(x)
        expected = reference_forward(vit, x, at=(1,), keep=0.5)
        assert_close(vit.forward_head(tokens), expected, rtol=1e-4, atol=1e-5)
