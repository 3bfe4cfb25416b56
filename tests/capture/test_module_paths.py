"""Every module path a report or a refusal shows resolves on the user's own model
(`model.get_submodule(path)`), whichever capture path produced the graph."""
import re

import pytest
import torch
from torch import nn

import repshift_fx
from conftest import tiny_timm

pytestmark = pytest.mark.fresh_traces  # capture is the subject here: every compress() traces anew

transformers = pytest.importorskip("transformers")


def _reported_paths(report) -> list[str]:
    paths = [row.module for row in report.blocks if row.module]
    for text in report.refused + [row.refused for row in report.blocks if row.refused]:
        paths += [p for p in re.findall(r"module '([^']*)'", text) if p not in ("", "-", "root")]
    paths += re.findall(r'label="[^"]*?\b((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*\.\d+(?:\.\w+)*)', report.to_dot())
    return paths


def _assert_resolve(model: nn.Module, report) -> None:
    paths = _reported_paths(report)
    assert paths, "the report names no module"
    for path in paths:
        model.get_submodule(path)  # AttributeError if the path is not the user's


class _ShapeBranching(nn.Module):
    """Branches on a size in Python: torch.fx cannot trace it, torch._dynamo.export can."""

    def __init__(self, dim=16, depth=4):
        super().__init__()
        self.vit = tiny_timm("deit_tiny_patch16_224", depth=depth)

    def forward(self, x):
        if x.shape[-1] > 32:
            return self.vit(x)
        return self.vit(nn.functional.interpolate(x, size=64))


def test_fx_traced_paths_resolve():
    model = tiny_timm("deit_tiny_patch16_224")
    _assert_resolve(model, repshift_fx.inspect(model, torch.randn(2, 3, 64, 64), at=(1,)))


def test_dynamo_exported_paths_resolve():
    model = _ShapeBranching().eval()
    report = repshift_fx.inspect(model, torch.randn(2, 3, 64, 64), at=(1,))
    assert all(row.module.startswith("vit.blocks.") for row in report.blocks)
    _assert_resolve(model, report)


def test_transformers_paths_resolve_in_a_refusal():
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=2, num_key_value_heads=2)
    model = transformers.LlamaModel._from_config(config, attn_implementation="sdpa").eval()
    report = repshift_fx.inspect(model, {"input_ids": torch.randint(3, 100, (2, 10))}, keep=0.5, at=(0,))
    assert report.refused and "args.0" not in str(report)
    _assert_resolve(model, report)


def test_transformers_classifier_paths_resolve():
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8, num_labels=3)
    model = transformers.ViTForImageClassification._from_config(config, attn_implementation="sdpa").eval()
    report = repshift_fx.inspect(model, torch.randn(2, 3, 32, 32), at=(1,))
    assert any(row.tokens_out < row.tokens_in for row in report.blocks)
    _assert_resolve(model, report)
