"""Accuracy retention of text models: a sentence encoder on labelled text (WordNet definitions).

    loaded = hf_specs.load_text_model("hf:minilm")            # or hf:DIR, a saved transformers encoder
    setup = prepare(loaded, load_dataset("wordnet", "train", 2000), load_dataset("wordnet", "test", 1000))
    rows = sweep(setup, evaluation.parse_variants("shift,norm,random"), keeps=(1.0, 0.7, 0.5))

Features: the sentence embedding, the mean of the encoder's last hidden states over the real
(non-pad) tokens, L2-normalised (what sentence-transformers' all-MiniLM-L6-v2 does;
`repshift_fx.apps.hf.SentenceEmbedding`). Texts are sorted by token count and cut into batches, each
padded to its longest text (`repshift_fx.apps.hf.text_batches`), so `compress()` sees a fixed token
count per batch: every batch shape is traced once (`capture.reuse_traces`) and compressed for each
score and keep rate; the pass drops padded positions first. GFLOPs per sample are counted per
batch, on its padded length, and averaged over the test texts. The probe, agreement and table are
those of `repshift_fx.apps.evaluation.images` (head "probe" only: an encoder has no classifier).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from repshift_fx.apps import hf
from repshift_fx.capture import reuse_traces
from repshift_fx.apps.data.datasets import DataError, TextDataset
from repshift_fx.apps.evaluation.images import KEEPS, EvalRow, LinearProbe, Scoring, Variant, cached, options
from repshift_fx.apps.evaluation.images import sweep as _sweep
from repshift_fx.flops import per_sample_gmacs
from repshift_fx.apps.hf_specs import TEXT_SPECS, TextModel
from repshift_fx.calibration.measure import compress_within_reach

# --- the unpruned model, once ---


@dataclass
class TextSetup(Scoring):
    """What the sweep reuses: the test batches, the probe, the unpruned predictions and FLOPs."""

    model: nn.Module
    test: TextDataset
    batches: list  # [(positions in test, {"input_ids", "attention_mask"})], sorted by token count
    batch: int
    probe: LinearProbe
    reference: torch.Tensor  # (N,) the unpruned predictions on the test split
    gflops: float
    accuracy: float
    progress: bool = True
    seed: int = 0
    notes: list[str] = field(default_factory=list)
    head: ClassVar[str] = "probe"
    unit: ClassVar[str] = "texts"
    options_per_batch: ClassVar[bool] = True  # batches of several lengths: options may be chosen per batch


def _check_text(data, role: str) -> TextDataset:
    if not isinstance(data, TextDataset):
        raise DataError(f"the {role} data {getattr(data, 'name', data)!r} is images; a text model ({TEXT_SPECS}) "
                        "takes text: --data wordnet")
    if len(data) == 0:
        raise DataError(f"the {role} data {data.name!r} is empty")
    return data


def _batch_gmacs(module, rows, inputs) -> float:
    """GMACs of one batch: per sample, times the samples. FLOP counting calls the module
    positionally; it takes (input_ids, attention_mask) by keyword."""
    def call(input_ids, attention_mask):
        return module(input_ids=input_ids, attention_mask=attention_mask)

    return per_sample_gmacs(call, (inputs["input_ids"], inputs["attention_mask"])) * len(rows)


@torch.no_grad()
def run_batches(make, batches, n: int, desc: str = "", progress: bool = True, leave: bool = True,
                count: bool = False) -> tuple[torch.Tensor, float | None]:
    """(outputs (n, C) in the data's order, GFLOPs per sample averaged over the batches or None).
    `make(inputs)` gives the module that runs one batch (the model, or a model compressed for it)."""
    outputs, gmacs = None, 0.0
    for rows, inputs in tqdm(batches, desc=desc, disable=not progress, leave=leave, unit="batch"):
        module = make(inputs)
        vectors = module(**inputs).float()
        if outputs is None:
            outputs = torch.empty(n, vectors.shape[1])
        outputs[rows] = vectors
        if count:
            gmacs += _batch_gmacs(module, rows, inputs)
    return outputs, (gmacs / n if count else None)


def _features(loaded: TextModel, data: TextDataset, batch: int, cache, cache_id: dict, progress: bool,
              batches=None):
    """`batches`: `data`'s text batches where the caller already built them (else built on a cache miss)."""
    def compute():
        todo = batches if batches is not None else hf.text_batches(loaded.tokenizer, data.texts, batch,
                                                                   loaded.max_length)
        return run_batches(lambda _: loaded.model, todo, len(data), f"unpruned ({data.name})", progress)[0]

    return cached(compute, cache, data.name, data=data.name, n=len(data), batch=batch, max_length=loaded.max_length,
                  features="sentence embedding", **cache_id)


def _unpruned_gflops(model: nn.Module, batches, n: int) -> float:
    return sum(_batch_gmacs(model, rows, inputs) for rows, inputs in batches) / n


def prepare(loaded: TextModel, train: TextDataset, test: TextDataset, *, probe: str = "auto", batch: int = 64,
            cache: str | Path | None = None, cache_id: dict | None = None, progress: bool = True,
            seed: int = 0) -> TextSetup:
    """Embed the training and test texts with the unpruned model (or read them from `cache`), fit
    the probe on the training embeddings, predict the test ones."""
    train, test = _check_text(train, "training"), _check_text(test, "test")
    cache = Path(cache) if cache else None
    cache_id = dict(cache_id or {}, spec=loaded.spec, weights=loaded.ident)
    train_out = _features(loaded, train, batch, cache, cache_id, progress)
    batches = hf.text_batches(loaded.tokenizer, test.texts, batch, loaded.max_length)
    test_out = _features(loaded, test, batch, cache, cache_id, progress, batches)
    fitted = LinearProbe(probe).fit(train_out, train.labels)
    lengths = [inputs["input_ids"].shape[1] for _, inputs in batches]
    notes = [f"linear probe ({fitted.kind}) on {train_out.shape[1]} features (mean-pooled, L2-normalised sentence "
             f"embeddings) of {len(train)} {train.name} texts, fitted on the unpruned model",
             f"{len(batches)} test batches sorted by length, each padded to its longest text: {min(lengths)} to "
             f"{max(lengths)} tokens; GFLOPs are per text, averaged over the batches"]
    setup = TextSetup(loaded.model, test, batches, batch, fitted, torch.empty(0),
                      _unpruned_gflops(loaded.model, batches, len(test)), 0.0, progress, seed, notes)
    setup.reference = fitted.predict(test_out)
    setup.accuracy = (setup.reference == test.labels).double().mean().item()
    return setup


# --- the sweep ---


def evaluate(setup: TextSetup, variant: Variant, keep: float, at=None, fuse: bool = False) -> EvalRow:
    """Compress the model for each test batch with `variant` at `keep`, run it, score it."""
    return evaluate_options(setup, variant.label, keep,
                            lambda inputs: options(setup.model, inputs, variant, keep, at, fuse))


def evaluate_options(setup: TextSetup, label: str, keep: float, config) -> EvalRow:
    """Compress the model for each test batch with the compress() options `config` (or
    `config(inputs)`, the options for one batch), run it, score it. A batch whose length cannot reach
    the FLOP target runs the deepest schedule it allows (as calibrate() measures it); a note counts
    those batches."""
    short = []

    def make(inputs):
        gm, reached = compress_within_reach(setup.model, inputs, _for_batch(config, inputs))
        if not reached:
            short.append(inputs["input_ids"].shape)
        return gm

    torch.manual_seed(setup.seed)  # random scores: the same draws on every run
    outputs, gflops = run_batches(make, setup.batches, len(setup.test), f"{label} keep={keep}",
                                  setup.progress, leave=False, count=True)
    accuracy, agreement = setup.scores(outputs)
    if short:
        setup.notes.append(f"{label}: {len(short)} of {len(setup.batches)} test batches (shapes "
                           f"{', '.join(f'{b}x{n}' for b, n in short)}) cannot reach its FLOP target; they ran the "
                           "deepest schedule they allow")
    return EvalRow(label, keep, gflops, gflops / setup.gflops, accuracy, agreement)


def _for_batch(options, inputs) -> dict:
    return options(inputs) if callable(options) else options


def sweep(setup: TextSetup, variants: list[Variant], keeps=KEEPS, at=None, fuse: bool = False) -> list[EvalRow]:
    """`repshift_fx.apps.evaluation.images.sweep` for text: each batch shape is traced once for all the rows."""
    with reuse_traces():
        return _sweep(setup, variants, keeps, at, fuse, run=evaluate)
