"""Every entry point refuses bad input in the user's words (issue #31): the backend's and export's
options go through compress()'s checks, booleans are booleans, an empty example is refused, and
the compressed model checks what it is called with before its graph runs: another input size is an
ExampleInputError (eager and compiled), another batch size runs, another dtype and NaN behave as in
the model, a missing keyword input is named."""
import math

import pytest
import torch

import repshift_fx
from conftest import assert_refused, tiny_timm
from repshift_fx import ConfigError, ExampleInputError, RepShiftError

X = torch.randn(2, 3, 64, 64)


@pytest.fixture(scope="module")
def flexible():
    """A ViT that runs at any resolution (timm's dynamic_img_size), and its compressed graph at 64 px."""
    model = tiny_timm("deit_tiny_patch16_224", dynamic_img_size=True)
    return model, repshift_fx.compress(model, X, compile=False)


@pytest.mark.parametrize("options, words", [(dict(backend="nope"), "not a torch.compile backend"),
                                            (dict(backend=3), "got int"), (dict(backend="repshift"), "prune"),
                                            (dict(backend=repshift_fx.backend(keep=0.5)), "prune"),
                                            (dict(options={"nope": 1}), "unknown: ['nope']"),
                                            (dict(options=[1]), "got list")])
def test_torch_compile_options_are_checked_before_the_pass_runs(deit, options, words):
    with pytest.raises(ConfigError) as caught:
        repshift_fx.compress(deit, X, **options)
    assert words in str(caught.value)


def test_the_backend_refuses_a_typo_as_compress_does(deit):
    with pytest.raises(ConfigError, match=r"unknown option 'kepe'; did you mean 'keep'\?") as from_compress:
        repshift_fx.compress(deit, X, kepe=0.5)
    with pytest.raises(ConfigError) as from_backend:
        repshift_fx.backend(kepe=0.5)
    assert str(from_backend.value) == str(from_compress.value)
    with pytest.raises(ConfigError, match="did you mean 'inner'"):
        repshift_fx.backend(iner="eager")
    with pytest.raises(ConfigError, match="fuse is a boolean"):
        repshift_fx.backend(fuse="yes")
    with pytest.raises(ConfigError, match="target_flops is compress"):
        repshift_fx.backend(target_flops=0.5)
    assert repshift_fx.backend(keep=0.5, at=[1, 2], inner="eager").config.at == (1, 2)


ENTRY_POINTS = {  # each called with a misspelt option: nothing runs before it is refused
    "compress": lambda model, **options: repshift_fx.compress(model, X, **options),
    "inspect": lambda model, **options: repshift_fx.inspect(model, X, **options),
    "backend": lambda model, **options: repshift_fx.backend(**options),
    "export": lambda model, **options: repshift_fx.export(model, X, "never-written.onnx", **options),
    "calibrate": lambda model, **options: repshift_fx.calibrate(model, [X], target_flops=0.7, progress=False,
                                                               **options),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_entry_point_names_the_option_meant(deit, entry):
    """One check (repshift_fx.config.config_from) behind every entry point: the same words for a typo,
    and for a value out of a Literal field's choices."""
    with pytest.raises(ConfigError) as caught:
        ENTRY_POINTS[entry](deit, kepe=0.5)
    assert str(caught.value) == "unknown option 'kepe'; did you mean 'keep'?"
    with pytest.raises(ConfigError, match="site must be one of 'mlp', 'attn', 'block', got 'head'"):
        ENTRY_POINTS[entry](deit, site="head")


def test_an_entry_points_own_keywords_are_suggested_too(deit):
    with pytest.raises(ConfigError, match="did you mean 'max_candidates'"):
        ENTRY_POINTS["calibrate"](deit, max_candidate=2)
    with pytest.raises(ConfigError, match="did you mean 'compile'"):
        repshift_fx.compress(deit, X, compil=False)
    with pytest.raises(ConfigError, match="did you mean 'dynamic'"):  # torch.compile's, passed on
        repshift_fx.compress(deit, X, dynamc=True)


@pytest.mark.parametrize("typo,near", [("kepe", "keep"), ("dynamic_btch", "dynamic_batch"), ("backend", None)])
def test_export_refuses_a_typo_before_it_writes(deit, tmp_path, typo, near):
    with pytest.raises(ConfigError, match=f"unknown option '{typo}'" + (f"; did you mean '{near}'" if near else "")):
        repshift_fx.export(deit, X, tmp_path / "m.onnx", **{typo: 0.5})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("option", ["residual", "sdpa", "fuse"])
@pytest.mark.parametrize("value", ["yes", "x", 1, 0, None, "False"])
def test_boolean_options_take_booleans_only(deit, option, value):
    message = assert_refused(deit, X, ConfigError, f"{option} is a boolean", **{option: value})
    assert "True or False" in message and repr(value) in message


def test_restore_takes_auto_or_a_boolean(deit):
    assert_refused(deit, X, ConfigError, "restore must be 'auto', True or False", restore="yes")


@pytest.mark.parametrize("example", [torch.randn(0, 3, 64, 64), (torch.randn(0, 3, 64, 64),)])
def test_an_empty_example_is_refused(deit, example):
    assert_refused(deit, example, ExampleInputError, "at least one sample", "(0, 3, 64, 64)")


def test_an_empty_tuple_is_no_example(deit):
    assert_refused(deit, (), ExampleInputError, "an empty tuple")


def test_another_resolution_is_refused_before_the_graph_runs(flexible):
    model, gm = flexible
    with torch.no_grad():
        assert model(torch.randn(2, 3, 48, 48)).shape == (2, 1000)  # the model itself runs there
        with pytest.raises(ExampleInputError, match=r"compressed for input 'x' of shape \(B, 3, 64, 64\), got "
                                                    r"\(2, 3, 48, 48\).*Compress again"):
            gm(torch.randn(2, 3, 48, 48))
        with pytest.raises(ExampleInputError, match=r"got \(3, 64, 64\)"):
            gm(torch.randn(3, 64, 64))


def test_a_non_tensor_or_an_argument_fixed_in_the_graph_is_refused(flexible):
    model, gm = flexible
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for given, words in [((None,), r"a tensor as input 'x' .*got NoneType"), (([x],), r"got list"),
                             ((x.numpy(),), r"got ndarray"), ((x, x), r"too many positional arguments")]:
            with pytest.raises(ExampleInputError, match=words):
                gm(*given)


class WithOptionalScale(torch.nn.Module):
    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, x, scale=None):
        return self.vit(x) if scale is None else self.vit(x * scale)


def test_a_value_for_an_argument_the_example_left_out_is_refused(deit):
    model = WithOptionalScale(deit).eval()
    gm = repshift_fx.compress(model, X, keep=1.0, compile=False)  # scale=None is fixed in the graph
    with torch.no_grad():
        assert torch.allclose(gm(X, None), model(X), atol=1e-5)
        with pytest.raises(ExampleInputError, match=r"compressed for the example's inputs \(x\) alone.*defaults"):
            gm(X, torch.tensor(2.0))


def test_another_resolution_is_refused_when_compiled_too(flexible):
    model, _ = flexible
    torch._dynamo.reset()
    compiled = repshift_fx.compress(model, X, score="shift", backend="eager")
    with torch.no_grad():
        assert compiled(torch.randn(3, 3, 64, 64)).shape == (3, 1000)
        with pytest.raises(ExampleInputError, match=r"compressed for input 'x' of shape \(B, 3, 64, 64\)"):
            compiled(torch.randn(2, 3, 48, 48))
        assert compiled(X).shape == (2, 1000)  # and it still runs at its own size
    assert compiled.report.tokens == [17, 17, 13, 10]


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_another_batch_size_runs(flexible, batch):
    model, gm = flexible
    x = torch.randn(batch, 3, 64, 64)
    with torch.no_grad():
        assert gm(x).shape == model(x).shape == (batch, 1000)
        assert gm(x=x).shape == (batch, 1000)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.int64])
def test_another_dtype_behaves_as_in_the_model(flexible, dtype):
    """Both raise (the weights are float32), or both run: never a new kind of failure."""
    model, gm = flexible
    x = (X * 10).to(dtype)
    outcomes = []
    for module in (model, gm):
        try:
            with torch.no_grad():
                module(x)
            outcomes.append(None)
        except RepShiftError:
            outcomes.append("RepShiftError")
        except (RuntimeError, TypeError) as err:
            outcomes.append(type(err).__name__)
    assert outcomes[0] == outcomes[1]


def test_nan_input_passes_through_as_in_the_model(flexible):
    model, gm = flexible
    x = X.clone()
    x[1, :, 5, 7] = math.nan
    with torch.no_grad():
        want, got = model(x), gm(x)
    assert torch.equal(want.isnan(), got.isnan())
    assert got[1].isnan().all() and not got[0].isnan().any()


def test_a_missing_keyword_input_is_named():
    from test_hf import tiny_bert

    model = tiny_bert("sdpa")
    mask = torch.ones(2, 12, dtype=torch.long)
    text = {"input_ids": torch.randint(1, 100, (2, 12)), "attention_mask": mask}
    gm = repshift_fx.compress(model, text, keep=0.5, at=(0, 1), compile=False)
    with torch.no_grad():
        assert gm(**text).last_hidden_state.shape == (2, 12, 32)
        with pytest.raises(ExampleInputError, match="'attention_mask'") as caught:
            gm(input_ids=text["input_ids"])
        assert "(input_ids, attention_mask)" in str(caught.value)
        with pytest.raises(ExampleInputError, match="'input_ids'"):
            gm(attention_mask=mask)
        with pytest.raises(ExampleInputError, match=r"input 'input_ids' of shape \(B, 12\), got \(2, 10\)"):
            gm(**{k: v[:, :10] for k, v in text.items()})
