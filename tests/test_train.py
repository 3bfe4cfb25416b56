"""train=True: the reduction in a training graph. Gradients reach the model's own parameters and
equal those of the model itself (nothing reduced) and of an independent eager reference (drop,
merge, ToMe: tests/reference.py, tests/reference_merge.py, run with gradients)."""
import pytest
import timm
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


def loss_grads(model, loss) -> dict:
    """The gradient of `loss()` (a scalar) on every parameter of `model` that gets one."""
    model.zero_grad(set_to_none=True)
    loss().backward()
    found = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return found


def grads(model, forward) -> dict:
    """The gradient of (logits * WEIGHT).sum() on every parameter of `model`, through `forward`."""
    return loss_grads(model, lambda: (forward(X) * WEIGHT).sum())


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
    (dict(score="tome", r=2, merge_metric="ward"), lambda m, x: merge_forward.__wrapped__(m, x, tome_r=2, metric="ward")),
], ids=["drop", "merge", "tome", "tome-ward"])
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
            return loss_grads(encoder, lambda: (forward() * weight[:batch]).sum())

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


NOISY = dict(drop_rate=0.1, drop_path_rate=0.1, proj_drop_rate=0.1)  # dropout in MLPs, projections, head; drop-path


def seeded_grads(model, forward, seed: int = 5) -> dict:
    """`grads` with the random streams started from `seed`: dropout and drop-path draw alike on both sides."""
    torch.manual_seed(seed)
    return grads(model, forward)


def test_dropout_and_drop_path_train_like_the_model_on_the_same_draws():
    noisy = tiny_timm("deit_tiny_patch16_224", num_classes=10, attn_drop_rate=0.1, **NOISY).train()
    before = snapshot(noisy)
    gm = repshift_fx.compress(noisy, X, train=True, keep=1.0, at=(1, 2), compile=False)
    assert_unchanged(noisy, before)
    want = seeded_grads(noisy, noisy)
    assert_same_grads(seeded_grads(noisy, gm), want)
    other = seeded_grads(noisy, gm, seed=6)  # the draws are real: another seed, other gradients
    assert max((other[n] - want[n]).abs().max().item() for n in want) > 1e-3


@pytest.mark.parametrize("config,reference,attn_drop", [
    (dict(keep=0.5, at=(1,)), lambda m, x: reference_forward.__wrapped__(m, x, (1,), 0.5), 0.1),
    (dict(keep=0.5, at=(1,), reduce="merge"), lambda m, x: merge_forward.__wrapped__(m, x, at=(1,), keep=0.5), 0.0),
    (dict(score="tome", r=2), lambda m, x: merge_forward.__wrapped__(m, x, tome_r=2), 0.0),
], ids=["drop", "merge", "tome"])
def test_gradients_with_dropout_equal_the_eager_reference_on_the_same_draws(config, reference, attn_drop):
    """The references call the model's own dropout and drop-path modules in the model's order; the
    merge reference writes its attention out, so SDPA's own attention dropout is off there."""
    noisy = tiny_timm("deit_tiny_patch16_224", num_classes=10, attn_drop_rate=attn_drop, **NOISY).train()
    gm = repshift_fx.compress(noisy, X, train=True, compile=False, **config)
    assert_same_grads(seeded_grads(noisy, gm), seeded_grads(noisy, lambda x: reference(noisy, x)))


def test_dropout_on_explicit_attention_weights_becomes_sdpas_dropout():
    """softmax -> attn_drop -> @ v (timm without fused attention) is rewritten to SDPA with
    dropout_p=p in training, 0 in eval: the attention dropout is neither lost nor kept at inference."""
    model = tiny_timm("deit_tiny_patch16_224", num_classes=10, fused=False, attn_drop_rate=0.25)

    def rates(graph):
        return {n.kwargs["dropout_p"] for n in graph.graph.nodes if "scaled_dot_product" in str(n.target)}

    assert rates(repshift_fx.compress(model, X, keep=0.5, at=(1,), compile=False)) == {0.0}
    gm = repshift_fx.compress(model.train(), X, train=True, keep=0.5, at=(1,), compile=False)
    assert rates(gm) == {0.25}
    torch.manual_seed(0)
    first = gm(X)
    assert not torch.equal(first, gm(X))
    assert all(g.isfinite().all() for g in grads(model, gm).values())


def test_a_training_graph_refuses_to_run_in_eval_mode(model):
    gm = repshift_fx.compress(model, X, train=True, keep=0.5, at=(1,), compile=False)
    gm.eval()
    with pytest.raises(ModelModeError, match="compress the model in eval mode"):
        gm(X)


def test_batch_norm_statistics_train_through_the_graph_and_not_through_compress():
    """LeViT normalises its tokens with BatchNorm: compress() runs the model and leaves its running
    statistics and the random streams as they were; the graph's training call updates them as the
    model's own would (nothing reduced)."""
    torch.manual_seed(0)
    levit = timm.create_model("levit_128s", img_size=128, num_classes=10).train()
    image = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    before, rng = snapshot(levit), torch.get_rng_state()
    gm = repshift_fx.compress(levit, image, train=True, keep=1.0, compile=False)
    assert_unchanged(levit, before)
    assert torch.equal(torch.get_rng_state(), rng)
    gm(image)
    after_graph = {k: v.clone() for k, v in levit.state_dict().items()}
    levit.load_state_dict(before["state"])
    levit(image)
    moved = [k for k, v in levit.state_dict().items() if "running_mean" in k and not torch.equal(v, before["state"][k])]
    assert moved and all(torch.allclose(after_graph[k], v, atol=1e-6) for k, v in levit.state_dict().items())
    reduced = repshift_fx.compress(levit, image, train=True, keep=0.5, compile=False)
    assert reduced.report.tokens[-1] < reduced.report.tokens[0]
    (reduced(image) * torch.randn(2, 10)).sum().backward()


def test_a_bert_with_its_default_dropout_trains_like_the_model_on_the_same_draws():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)  # dropout 0.1, as shipped
    torch.manual_seed(0)
    bert = transformers.BertModel._from_config(config, attn_implementation="sdpa").train()
    ids = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    text = {"input_ids": ids, "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    gm = repshift_fx.compress(bert, text, train=True, keep=1.0, at=(0, 1), compile=False)
    weight = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(3))

    def hidden_grads(forward):
        torch.manual_seed(5)
        return loss_grads(bert, lambda: (forward(**text).last_hidden_state * weight).sum())

    assert_same_grads(hidden_grads(gm), hidden_grads(bert))


def test_calibrate_and_export_refuse_train(model, tmp_path):
    with pytest.raises(ConfigError, match="train=True is for compress"):
        repshift_fx.calibrate(model, [X], target_flops=0.7, train=True)
    with pytest.raises(ConfigError, match="train=True is for compress"):
        repshift_fx.export(model, X, tmp_path / "m.onnx", train=True)


def test_the_backend_trains_like_compress_on_the_same_draws():
    """torch.compile(model, backend=repshift_fx.backend(train=True, ...)) then backward: the same
    graph as compress(train=True), dropout and drop-path drawing alike (inner="eager")."""
    torch._dynamo.reset()
    noisy = tiny_timm("deit_tiny_patch16_224", num_classes=10, **NOISY).train()
    backend = repshift_fx.backend(train=True, keep=0.5, at=(1,), inner="eager")
    compiled = torch.compile(noisy, backend=backend)
    got = seeded_grads(noisy, compiled)
    assert backend.reports and backend.reports[0].tokens == [17, 17, 9, 9]
    want = seeded_grads(noisy, repshift_fx.compress(noisy, X, train=True, keep=0.5, at=(1,), compile=False))
    assert_same_grads(got, want)
    with pytest.raises(Exception, match=r"in module '\w+'.*train=True"):  # without train=True: refused, by module
        torch._dynamo.reset()
        torch.compile(noisy, backend=repshift_fx.backend(keep=0.5, at=(1,), inner="eager"))(X)
    torch._dynamo.reset()


def test_the_backend_compiles_forward_and_backward_through_the_reduction(model):
    """Inductor (AOTAutograd) behind the backend: the gradients equal the eager reference's."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=repshift_fx.backend(train=True, keep=0.5, at=(1,)))
    got = grads(model, compiled)
    torch._dynamo.reset()
    assert_same_grads(got, grads(model, lambda x: reference_forward.__wrapped__(model, x, (1,), 0.5)), tol=1e-4)


def test_inspect_reports_the_training_graph(model):
    report = repshift_fx.inspect(model, X, train=True, keep=0.5, at=(1,))
    assert report.flop_ratio < 0.8 and report.tokens == [17, 17, 9, 9]


def test_a_cnn_trains_through_its_line_drops_with_batch_norm():
    """Lines mode in training (torchvision ResNet-18, BatchNorm in every block): compress() leaves the
    statistics alone; at keep=1.0 the graph computes the model's output, at 0.7 it trains."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(num_classes=10).train()
    image = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    before = snapshot(resnet)
    same = repshift_fx.compress(resnet, image, train=True, keep=1.0, compile=False)
    reduced = repshift_fx.compress(resnet, image, train=True, keep=0.7, compile=False)
    assert_unchanged(resnet, before)
    assert_close(same(image), resnet(image))
    resnet.zero_grad(set_to_none=True)
    (reduced(image) * torch.randn(4, 10)).sum().backward()
    assert resnet.conv1.weight.grad is not None and resnet.conv1.weight.grad.isfinite().all()
    assert repshift_fx.inspect(resnet, image, train=True, keep=0.7).flop_ratio < 0.9


def test_a_model_built_in_inference_mode_still_compresses():
    """compress() restores only the buffers a run changed: an inference tensor (a model built under
    torch.inference_mode) cannot be written outside it, and an eval model changes none."""
    with torch.inference_mode():
        built = tiny_timm("deit_tiny_patch16_224", num_classes=10)
        built.register_buffer("table", torch.arange(4.0))
    gm = repshift_fx.compress(built, X, keep=0.5, at=(1,), compile=False)
    assert gm.report.tokens == [17, 17, 9, 9] and torch.equal(built.table, torch.arange(4.0))
