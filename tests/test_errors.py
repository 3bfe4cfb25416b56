"""Bad input: a RepShiftError subclass with an actionable message, and the model unchanged."""
import pytest
import timm
import torch
from torch import nn

import repshift_fx
from conftest import assert_refused, tiny_timm
from repshift_fx import (
    ConfigError, ExampleInputError, ModelModeError, NoSiteError, TraceError, UnsupportedSiteError,
)


@pytest.fixture
def model():
    return tiny_timm("deit_tiny_patch16_224")


X = torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize("keep", [0, 1.5, -0.2, "0.5", (0.5, 2.0)])
def test_keep_outside_unit_interval(model, keep):
    assert_refused(model, X, ConfigError, "keep", keep=keep, at=(1,) if not isinstance(keep, tuple) else (1, 2))


def test_at_out_of_range_says_how_many_blocks(model):
    message = assert_refused(model, X, ConfigError, "4 blocks were found", at=(1, 4))
    assert "[4]" in message


@pytest.mark.parametrize("at", [(2, 2), (2, 1)])
def test_repeated_or_unsorted_at(model, at):
    assert_refused(model, X, ConfigError, "strictly increasing", at=at)


@pytest.mark.parametrize("at", [{1, 2}, "1,2", {1: 0.5}])
def test_at_that_is_no_sequence_is_refused(model, at):
    assert_refused(model, X, ConfigError, "at must be a sequence of block indices", at=at)


def test_keep_per_block_must_match_at(model):
    assert_refused(model, X, ConfigError, "one rate per", at=(1, 2), keep=(0.5, 0.5, 0.5))


@pytest.mark.parametrize("option", [{"site": "head"}, {"distance": "kl"}, {"score": "attention_map"}, {"protect": -1}])
def test_unknown_choices(model, option):
    assert_refused(model, X, ConfigError, next(iter(option)), **option)


def test_inspect_rejects_unknown_options(model):
    with pytest.raises(ConfigError, match="unknown option"):
        repshift_fx.inspect(model, X, kepp=0.5)


def test_training_mode_refused(model):
    model.train()
    assert_refused(model, X, ModelModeError, "model.eval()")
    assert model.training


def test_wrong_input_size_says_what_the_model_expects(model):
    assert_refused(model, torch.randn(2, 3, 32, 32), ExampleInputError, "expects (B, 3, 64, 64)")


def test_wrong_input_rank(model):
    assert_refused(model, torch.randn(3, 64, 64), ExampleInputError, "(3, 64, 64)")


def test_example_input_of_wrong_type(model):
    assert_refused(model, [[1.0]], ExampleInputError, "tensor")


def test_no_residual_mlp_says_what_was_found():
    class AttentionOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):
            return x + self.attn(x, x, x, need_weights=False)[0]

    message = assert_refused(AttentionOnly().eval(), torch.randn(2, 5, 16), NoSiteError, "no residual MLP")
    assert "attention at 'attn'" in message


def test_cnn_without_tokens():
    assert_refused(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval(), torch.randn(1, 3, 8, 8), NoSiteError,
                   "no residual add over tokens")


def test_untraceable_model_names_the_module():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(4, 4)
            self.gate = Branchy()

        def forward(self, x):
            return self.gate(self.stem(x))

    message = assert_refused(Net().eval(), torch.randn(2, 3, 4), TraceError, "module 'gate' (Branchy)")
    assert "backend='repshift'" in message


# EVA02's rotary tables are gathered with the kept tokens now, not refused: tests/test_side_tensors.py


def test_windowed_attention_refuses_a_merge_naming_the_block_and_module():
    """(A drop there becomes an MLP-only drop: tests/passes/test_mlp_only_drops.py.)"""
    model = timm.create_model("swin_tiny_patch4_window7_224", img_size=112, depths=(2, 2), num_heads=(2, 4),
                              embed_dim=32).eval()
    message = assert_refused(model, torch.randn(1, 3, 112, 112), UnsupportedSiteError, "block 0", at=(0,),
                             reduce="merge")
    assert "module 'layers." in message and "node" not in message


def test_a_model_with_one_token_block_is_refused_saying_why():
    """A drop after the only block leaves nothing running on fewer tokens (EfficientFormer-L1's
    last stage): the message says so and proposes lines mode, not an `at` that prunes nothing."""
    model = timm.create_model("deit_tiny_patch16_224", depth=1, img_size=32, patch_size=8).eval()
    message = assert_refused(model, torch.randn(1, 3, 32, 32), ConfigError, "1 token block", "'blocks.0'",
                             "no block running on fewer tokens", "mode='lines'")
    assert "at=(0,)" not in message


def test_wrong_input_size_gives_the_models_own_message_with_real_sizes(model):
    message = assert_refused(model, torch.randn(2, 3, 48, 48), ExampleInputError, "(2, 3, 48, 48)",
                             "Input height (48) doesn't match model (64)")
    assert "traced size" not in message


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.int64])
def test_wrong_input_dtype_names_the_dtypes_not_a_node(model, dtype):
    x = torch.randn(2, 3, 64, 64).to(dtype)
    assert_refused(model, x, ExampleInputError, "does not fit VisionTransformer")


def test_a_submodule_in_training_mode_is_refused_where_it_matters_and_keeps_its_mode(model):
    model.blocks[0].mlp.drop1 = nn.Dropout(0.1)  # assigned after model.eval(): in training mode
    assert_refused(model, X, ModelModeError, "'blocks.0.mlp.drop1' (Dropout) is in training mode", "model.eval()")
    assert model.blocks[0].mlp.drop1.training and not model.blocks[1].mlp.drop1.training


def test_a_submodule_in_training_mode_that_computes_the_same_is_taken_as_it_is(model):
    model.head = nn.Identity()  # the usual way to a feature extractor, after model.eval()
    model.blocks[0].attn.train()  # its dropout rates are 0: training mode computes the same
    graph = repshift_fx.compress(model, X, keep=1.0, compile=False)
    with torch.no_grad():
        assert torch.allclose(graph(X), model(X), atol=1e-5)
    assert model.head.training and model.blocks[0].attn.qkv.training  # modes as they were


def test_compressing_leaves_the_modes_of_the_models_modules_alone(model):
    """The graph shares the model's modules: setting its own mode must not set theirs (a frozen
    batch norm, in eval mode inside a training model, stays frozen)."""
    model.train()
    model.blocks[1].norm1.eval()
    before = {name: m.training for name, m in model.named_modules()}
    graph = repshift_fx.compress(model, X, train=True, keep=0.7, compile=False)
    assert {name: m.training for name, m in model.named_modules()} == before
    assert graph.training


@pytest.mark.parametrize("given,error,words", [
    (None, ConfigError, "expected a torch.nn.Module, got NoneType"),
    (lambda x: x, ConfigError, "got function"),
    ("meta", ConfigError, "on the meta device"),
])
def test_not_a_model_is_refused_before_anything_runs(given, error, words):
    if given == "meta":
        given = tiny_timm("deit_tiny_patch16_224").to("meta")
    for entry in (repshift_fx.compress, repshift_fx.inspect):
        with pytest.raises(error, match=words):
            entry(given, X)


def test_a_meta_example_a_word_for_compile_or_compile_options_without_compiling_are_refused(model):
    assert_refused(model, X.to("meta"), ExampleInputError, "meta device")
    with pytest.raises(ConfigError, match="compile must be True or False"):
        repshift_fx.compress(model, X, compile="yes")
    assert_refused(model, X, ConfigError, "(backend=, compile_mode=) were given with compile=False", keep=0.5,
                   backend="eager", compile_mode="max-autotune")


def test_an_empty_dict_example_says_it_is_empty(model):
    assert_refused(model, {}, ExampleInputError, "e.g. {'input_ids': ids, 'attention_mask': mask}; it is empty")


def test_an_example_the_model_takes_by_keyword_only_says_so():
    class KeywordOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Linear(16, 16)

        def forward(self, *, x):
            return x + self.mlp(x)

    assert_refused(KeywordOnly().eval(), torch.randn(5, 20, 16), ExampleInputError,
                   "the example input (5, 20, 16) does not fit KeywordOnly", "takes 1 positional argument")
