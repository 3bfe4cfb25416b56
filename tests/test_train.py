"""train=True: the reduction in a training graph. Gradients reach the model's own parameters and
equal those of the model itself (nothing reduced) and of an independent eager reference (drop,
merge, ToMe: tests/reference.py, tests/reference_merge.py, run with gradients)."""
import pytest
import torch

import repshift_fx
from conftest import assert_close, assert_unchanged, snapshot, tiny_timm
from reference import reference_forward
from reference_hf import bert_reference
from reference_merge import merge_forward
from repshift_fx import ConfigError, ModelModeError

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
WEIGHT = torch.randn(2, 10, generator=torch.Generator().manual_seed(1))  # a loss with every logit in it


@pytest.fixture
def model():
    return tiny_timm("deit_tiny_patch16_224", num_classes=10).train()  # timm's default rates: no dropout


def grads(model, forward) -> dict:
    """The gradient of (logits * WEIGHT).sum() on every parameter of `model`, through `forward`."""
    model.zero_grad(set_to_none=True)
    (forward(X) * WEIGHT).sum().backward()
    found = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return found


def assert_same_grads(got: dict, want: dict, tol: float = 1e-5) -> None:
    """Every gradient within tol of the reference's largest entry, or of 1e-4 of the largest of all
    (some are zero but for rounding: attention's key bias shifts every logit of a query alike)."""
    assert got.keys() == want.keys() and len(want) > 10
    floor = 1e-4 * max(g.abs().max().item() for g in want.values())
    for name in want:
        error = (got[name] - want[name]).abs().max().item() / max(want[name].abs().max().item(), floor)
        assert error <= tol, (name, error)


def test_reducing_nothing_trains_like_the_model(model):
    gm = repshift_fx.compress(model, X, train=True, keep=1.0, at=(1, 2), compile=False)
    assert gm.training
    assert_same_grads(grads(model, gm), grads(model, model))


@pytest.mark.parametrize("config,reference", [
    (dict(keep=0.5, at=(1,)), lambda m, x: reference_forward.__wrapped__(m, x, (1,), 0.5)),
    (dict(keep=0.5, at=(1,), reduce="merge"), lambda m, x: merge_forward.__wrapped__(m, x, at=(1,), keep=0.5)),
    (dict(score="tome", r=2), lambda m, x: merge_forward.__wrapped__(m, x, tome_r=2)),
], ids=["drop", "merge", "tome"])
def test_gradients_equal_the_eager_reference(model, config, reference):
    gm = repshift_fx.compress(model, X, train=True, compile=False, **config)
    want = grads(model, lambda x: reference(model, x))
    assert_same_grads(grads(model, gm), want)
    assert want.keys() == grads(model, model).keys()  # every parameter the model trains, the reduced graph trains


def test_a_padded_bert_trains_like_the_eager_reference():
    """A Hugging Face BERT (no dropout) in mean pooling, three texts of which two are padded: the
    gradients through per-sample drops equal the reference's, at the example's batch and another."""
    transformers = pytest.importorskip("transformers")
    from repshift_fx.apps.hf import SentenceEmbedding

    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    bert = transformers.BertModel._from_config(config, attn_implementation="sdpa")
    encoder = SentenceEmbedding(bert).train()
    ids = torch.randint(1, 100, (4, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[1, 8:], mask[2, 4:] = 0, 0
    gm = repshift_fx.compress(encoder, {"input_ids": ids[:3], "attention_mask": mask[:3]}, train=True, keep=0.5,
                              at=(0, 1), compile=False)
    weight = torch.randn(4, 32, generator=torch.Generator().manual_seed(3))
    for batch in (3, 4):  # the example's batch, and another
        text = {"input_ids": ids[:batch], "attention_mask": mask[:batch]}

        def pooled_grads(forward):
            encoder.zero_grad(set_to_none=True)
            (forward() * weight[:batch]).sum().backward()
            return {name: p.grad.clone() for name, p in encoder.named_parameters() if p.grad is not None}

        want = pooled_grads(lambda: bert_reference.__wrapped__(bert, ids[:batch], mask[:batch], (0, 1), 0.5))
        assert_same_grads(pooled_grads(lambda: gm(**text)), want)


def test_mixed_precision_trains_through_the_reduction(model):
    """torch.autocast (bfloat16 on CPU) as in inference: the gradients follow the fp32 reference's
    to bfloat16's precision."""
    gm = repshift_fx.compress(model, X, train=True, keep=0.5, at=(1,), compile=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = grads(model, gm)
    assert_same_grads(got, grads(model, lambda x: reference_forward.__wrapped__(model, x, (1,), 0.5)), tol=0.1)


def test_an_optimizer_on_the_models_parameters_trains_through_the_reduction(model):
    gm = repshift_fx.compress(model, X, train=True, keep=0.5, at=(1,), compile=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(gm(X), torch.tensor([3, 7]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[2] < losses[0]
    with torch.no_grad():  # the model itself moved: the graph holds its parameters
        assert_close(gm(X), reference_forward.__wrapped__(model, X, (1,), 0.5))


def test_compiled_training_step_equals_the_eager_one(model):
    eager = repshift_fx.compress(model, X, train=True, keep=0.5, at=(1,), compile=False)
    compiled = repshift_fx.compress(model, X, train=True, keep=0.5, at=(1,))
    assert_same_grads(grads(model, compiled), grads(model, eager), tol=1e-4)


def test_the_mode_must_match_train(model):
    with pytest.raises(ModelModeError, match="train=True"):
        repshift_fx.compress(model, X, compile=False)
    with pytest.raises(ConfigError, match="model.train()"):
        repshift_fx.compress(model.eval(), X, train=True, compile=False)


@pytest.mark.parametrize("rates", [dict(drop_rate=0.1), dict(drop_path_rate=0.1)])
def test_dropout_and_drop_path_are_refused_for_now(rates):
    noisy = tiny_timm("deit_tiny_patch16_224", num_classes=10, **rates).train()
    before = snapshot(noisy)
    with pytest.raises(ConfigError, match="at random"):
        repshift_fx.compress(noisy, X, train=True, compile=False)
    assert_unchanged(noisy, before)


def test_calibrate_export_and_the_backend_refuse_train(model, tmp_path):
    with pytest.raises(ConfigError, match="train=True is for compress"):
        repshift_fx.calibrate(model, [X], target_flops=0.7, train=True)
    with pytest.raises(ConfigError, match="train=True is for compress"):
        repshift_fx.export(model, X, tmp_path / "m.onnx", train=True)
    with pytest.raises(ConfigError, match="train=True is for compress"):
        repshift_fx.backend(train=True)


def test_inspect_reports_the_training_graph(model):
    report = repshift_fx.inspect(model, X, train=True, keep=0.5, at=(1,))
    assert report.flop_ratio < 0.8 and report.tokens == [17, 17, 9, 9]
