"""The zoo, fast subset (repshift_fx/apps/models/zoo.py FAST; the full sweep is tools/zoo.py -> docs/zoo.md):
each model prunes (FLOPs fall at keep 0.7, keep=1.0 equals the model to 1e-5, the output keeps
its shape, the model is unchanged) or is refused with a RepShiftError in the user's terms."""
from pathlib import Path

import pytest
import timm
import torch

import repshift_fx
from conftest import assert_close, assert_refused, assert_unchanged, flat_halves, load_tool, node_values, snapshot
from repshift_fx.apps.models import zoo as zoo_models

ROOT = Path(__file__).resolve().parents[1]
zoo = load_tool("zoo")  # tools/zoo.py

# what each model of the fast subset does today: a regression here is a change of behaviour
EXPECTED = {"timm:volo_d1_224": "prunes nothing (warns)"}
# Swin at this size drops for the MLPs of one later block alone (MLP-only drops: its windows need every token)
MOST_FLOPS = {"timm:swin_tiny_patch4_window7_224": 0.97}


@pytest.mark.parametrize("name", zoo_models.FAST)
def test_zoo_model_prunes_or_is_refused_in_the_users_terms(name):
    model, inputs = zoo_models.BY_NAME[name].build()
    before = snapshot(model)
    result = zoo.check(model, inputs)
    assert result["outcome"] == EXPECTED.get(name, "prunes"), result
    if result["outcome"] == "prunes":
        assert result["ratio"] < MOST_FLOPS.get(name, 0.95)
    if result["outcome"] == "refused":
        assert zoo.message_problems(result["reason"]) == []
    assert_unchanged(model, before)


def test_every_refusal_of_the_last_sweep_says_where_why_and_what_to_do():
    """docs/zoo.md is the full sweep's table: each refusal there keeps the message rules."""
    rows = [line.split("|") for line in (ROOT / "docs" / "zoo.md").read_text().splitlines()
            if line.startswith("| ") and "refused" in line]
    assert len(rows) >= 10
    for row in rows:
        assert row[3].strip() == "refused" and zoo.message_problems(row[5]) == [], row


def test_the_message_rules_catch_a_bad_message():
    assert zoo.message_problems("select_tokens at node 'repshift_index_3' failed: RuntimeError") == [
        "names an inserted node", "names a graph node", "says not where", "says not what to do"]
    assert zoo.message_problems("block 2 (layers.1): reshapes its tokens into a 7 x 7 grid; use mode='lines'") == []


@pytest.mark.parametrize("name", ["restore_dropped", "unmerge", "gather_tokens", "select_tokens", "merge_tokens",
                                  "representation_shift", "assign_to_kept", "read_tokens", "carry_origin"])
def test_the_message_rules_catch_a_function_the_pass_inserted(name):
    """A refusal blaming an op the pass inserted is the pass's failure said as the model's (coat_tiny's
    "restore_dropped in the model's top-level forward fails on fewer tokens"): flagged, by whole name."""
    assert name in zoo.INSERTED_FUNCTIONS
    message = f"the model's top-level forward, before the first block: {name} in the model's top-level forward " \
              "fails on fewer tokens (RuntimeError); drop only after it (at=...)"
    assert zoo.message_problems(message) == ["names an inserted node"]
    assert zoo.message_problems(message.replace(name, "interpolate")) == []


# refusals a sweep found naming values as the capture names them (issue #31), each with what to do
CAPTURED_NAMES = [
    "cat in module 'features.2' concatenates the pruned map with 'getitem_1', which keeps the full grid; use at=(3,)",
    "add in module 'stages.0.blocks.0' combines the pruned map with 'stages_0_blocks_0_shortcut'; prune after it",
    "mul in module 'neck.reassemble' reads 'hidden_states_7' (2, 65, 64) after the drop; use a later at=",
    "scaled_dot_product_attention in module 'h.2.attn' (its mask 'attention_mask_2' hides later tokens); use at=(3,)",
    "assert in module 'stages.1.blocks.0' fails: height (Proxy(getitem_30)) must be divisible by window (8); use at=",
]


@pytest.mark.parametrize("message", CAPTURED_NAMES)
def test_the_message_rules_catch_a_value_named_as_the_capture_names_it(message):
    assert zoo.message_problems(message) == ["names a captured value"]


def test_a_capture_error_may_name_the_graph_node_that_diverges():
    assert zoo.message_problems("module 'blocks.0' (Block), graph node 'add_3' differs from the model: report it") == []


# small models whose refusals once named captured values: (builder, example, words the refusal holds now)
REFUSED = {
    "convnextv2_atto": (lambda: timm.create_model("convnextv2_atto"), (2, 3, 64, 64),
                        "the output of module 'stages.0.blocks.0.shortcut', which keeps the full grid"),
    "rexnet_100": (lambda: timm.create_model("rexnet_100"), (2, 3, 64, 64),
                   "concatenates the pruned map with a slice of the output of module 'features.2.conv_pwl"),
    "maxvit_nano_rw_256": (lambda: timm.create_model("maxvit_nano_rw_256"), (1, 3, 256, 256),
                           "height (23) must be divisible by window (8)"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refusals_name_values_by_module_and_role(name):
    build, size, words = REFUSED[name]
    torch.manual_seed(0)
    message = assert_refused(build().eval(), torch.randn(size), repshift_fx.UnsupportedSiteError, words)
    assert zoo.message_problems(message) == [], message


def test_a_causal_mask_is_called_the_attention_mask():
    model, inputs = zoo_models.BY_NAME["hf:GPT2Model"].build()
    message = assert_refused(model, inputs, repshift_fx.UnsupportedSiteError, "its attention mask lets each token")
    assert zoo.message_problems(message) == [], message


def test_the_inserted_functions_are_the_public_functions_of_the_method_modules():
    """Computed from repshift_fx/method/*.py, so a function added there is covered; helpers
    (`_positions_in_kept`) and imports (F, torch) are not, and words merely containing a name are
    not flagged ("unmerged", "the tokens merge")."""
    assert {"restore_dropped", "unmerge", "bipartite_soft_matching", "fuse_dropped", "pinned_tokens",
            "gather_tokens", "carry_origin"} <= set(zoo.INSERTED_FUNCTIONS)
    assert "_positions_in_kept" not in zoo.INSERTED_FUNCTIONS and "F" not in zoo.INSERTED_FUNCTIONS
    assert zoo.message_problems("block 3 (blocks.3): the tokens merge, unmerged ones stay; use at=(1,)") == []


def test_a_side_tensor_without_a_batch_axis_is_gathered_for_each_sample():
    """HF BEiT adds a (heads, N, N) position bias built from the image size alone; with 2 heads
    and 2 samples its first axis is no batch axis. Each sample of the batch equals that sample
    compressed alone."""
    model, inputs = zoo_models.BY_NAME["hf:BeitModel"].build()
    x = inputs["pixel_values"]
    batch = repshift_fx.compress(model, inputs, keep=0.5, at=(0, 1), compile=False)
    with torch.no_grad():
        together = batch(pixel_values=x)[0]
        for i in range(x.shape[0]):
            alone = repshift_fx.compress(model, {"pixel_values": x[i:i + 1].repeat(3, 1, 1, 1)}, keep=0.5, at=(0, 1),
                                         compile=False)(pixel_values=x[i:i + 1].repeat(3, 1, 1, 1))[0]
            assert (together[i] - alone[0]).abs().max() <= 1e-5 * alone.abs().max()


def test_yolos_detection_tokens_after_the_patches_are_kept_at_every_drop():
    """YOLOS appends 5 learned detection tokens after the 16 patches (and builds its position
    embeddings by a cat of learned tables alone, which is no token cat): CLS is the prefix, the
    detection tokens are kept in place, the patches are pruned."""
    model, inputs = zoo_models.BY_NAME["hf:YolosModel"].build()
    gm = repshift_fx.compress(model, inputs, keep=0.5, at=(0, 1), compile=False)
    assert gm.report.prefix == 1 and gm.report.tokens[:3] == [22, 14, 10]  # 1 + 5 + 8 of 16, then 1 + 5 + 4
    assert any("the last 5 token(s)" in note for note in gm.report.notes)
    values = node_values(gm, *inputs.values())
    first = next(v for k, v in values.items() if k.startswith("repshift_index_"))
    assert first.shape == (2, 14) and (first[:, -5:] == torch.arange(17, 22)).all() and (first[:, 0] == 0).all()


def test_a_wrong_graph_is_reported_as_wrong():
    """The sweep's own check can fail: a model whose compressed graph differs is WRONG."""
    model, inputs = zoo_models.BY_NAME["timm:deit_tiny_patch16_224"].build()
    original = repshift_fx.compress

    def off_by_a_little(*args, **kwargs):
        gm = original(*args, **kwargs)
        return lambda x: gm(x) * 1.001
    try:
        repshift_fx.compress = off_by_a_little
        assert zoo.check(model, inputs)["outcome"] == "WRONG"
    finally:
        repshift_fx.compress = original
    with torch.no_grad():
        assert zoo.check(model, inputs)["outcome"] == "prunes"


def test_two_branch_crossvit_gathers_no_tokens_of_the_other_branch():
    """CrossViT runs two token streams side by side and fuses their CLS tokens. A drop in one branch
    once gathered the other branch's stream with its indices (cutting 401 tokens to 197), a wrong
    answer even at keep=1.0: now each side tensor goes through the drops of its own lineage only."""
    model, x = zoo_models.BY_NAME["timm:crossvit_tiny_240"].build()
    before = snapshot(model)
    last_stage = tuple(range(9, 15))  # branch 0: block 10; branch 1: blocks 11-14
    with torch.no_grad():
        want = model(x)
        got = repshift_fx.compress(model, x, keep=1.0, at=last_stage, compile=False)(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert_unchanged(model, before)


def test_two_branch_crossvit_merges_with_the_sizes_of_each_attentions_own_keys():
    """Each branch's CLS attends over the other branch's tokens in the fusion. Merges were refused
    (the sizes of one branch were added to the other's attention); each attention now weighs its
    keys by the sizes of the stream they come from. Without position embeddings and on an image
    of two flat colours, patch tokens come in identical copies (every row of patches is the same),
    so ToMe's matching merges copies only, and size-weighted merging with proportional attention
    must compute what the model computes; a drop does not (the CLS attends over fewer patches)."""
    model, _ = zoo_models.BY_NAME["timm:crossvit_tiny_240"].build()
    with torch.no_grad():
        model.pos_embed_0.zero_()
        model.pos_embed_1.zero_()
    x = flat_halves(2, 240)
    with torch.no_grad():
        want = model(x)
        merged = repshift_fx.compress(model, x, score="tome", r=4, compile=False)
        dropped = repshift_fx.compress(model, x, keep=0.7, compile=False)
        assert_close(merged(x), want)
        assert not torch.allclose(dropped(x), want, rtol=1e-3, atol=1e-3)
    assert min(merged.report.tokens) < max(merged.report.tokens[1:5])  # it did merge
    assert any("another branch" in note for note in merged.report.notes)  # the fusion over the branch that did not merge


def test_tome_by_default_merges_in_every_block_but_an_attention_pool():
    """SigLIP's attention-pool head is a token block of one query: ToMe's default blocks leave it out
    (it was in, and even r=0 failed in the matching of an empty set)."""
    model, x = zoo_models.BY_NAME["timm:vit_base_patch16_siglip_224"].build()
    with torch.no_grad():
        want = model(x)
        assert_close(repshift_fx.compress(model, x, score="tome", r=0, compile=False)(x), want)
    report = repshift_fx.inspect(model, x, score="tome", r=1)
    assert report.tokens == [16, 15, 1] and report.config["at"] == (0, 1)
