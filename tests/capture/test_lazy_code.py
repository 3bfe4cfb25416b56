"""Rewrites write the graph's Python code once, when it leaves the pipeline, not after every pass."""
import inspect

import pytest
import torch

import repshift_fx
import repshift_fx.pipeline as pipeline
from repshift_fx.capture import reuse_traces
from repshift_fx.config import Config
from conftest import assert_close

pytestmark = pytest.mark.fresh_traces  # capture is the subject here: every compress() traces anew


def test_a_rewrite_writes_its_code_once(deit, image, monkeypatch):
    written, python_code = [], torch.fx.Graph.python_code
    monkeypatch.setattr(torch.fx.Graph, "python_code",
                        lambda graph, *a, **k: written.append(graph) or python_code(graph, *a, **k))
    with reuse_traces():
        pipeline.rewrite(deit, image, Config(keep=0.7, reduce="merge"))  # the first trace: checked against the model
        written.clear()
        gm, _ = pipeline.run(deit, image, Config(keep=0.7, reduce="merge"), flops=False)
    assert len(written) == 1 and written[0] is gm.graph  # eleven passes recompile; the code is written once


def test_what_leaves_the_pipeline_is_a_plain_module_with_the_models_signature(deit, image):
    gm = repshift_fx.compress(deit, image, score="tome", target_flops=0.8, compile=False)
    placeholders = [n.target for n in gm.graph.find_nodes(op="placeholder")]
    assert list(inspect.signature(gm.forward).parameters) == placeholders and placeholders[0] == "x"
    assert "def forward(self, x" in gm.code
    with torch.inference_mode():
        assert_close(gm(x=image), gm(image))
