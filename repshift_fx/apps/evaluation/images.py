"""What pruning costs in accuracy: accuracy and agreement against GFLOPs, per score and keep rate.

    setup = prepare(loaded, train, test, head="probe")          # unpruned outputs (cached), probe fitted
    rows = sweep(setup, parse_variants("shift,attention,random"), keeps=(1.0, 0.7, 0.5, 0.3))
    print(format_rows(rows)); plot_rows(rows, "accuracy.png")

Heads (`head=`):
- "probe": the training-free setting of the paper. A linear probe (scikit-learn's
  LogisticRegression on standardised features, or a torch one) is fitted on the unpruned model's
  features of the training split, then applied unchanged to each pruned model's features.
  Features: "pooled" (the input of the classifier: timm's `reset_classifier(0)`, else the last
  nn.Linear of the model replaced by Identity) or "output" (the model's outputs).
- "model": the model's own classifier; accuracy needs labels that are the model's class indices
  (as many classes as outputs), else only agreement is reported.
Agreement: the share of test samples whose prediction is the unpruned model's prediction.
The model passed in is never changed: features come from a copy.
Text models (sentence encoders on WordNet definitions): `repshift_fx.apps.evaluation.text`.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from tabulate import tabulate
from torch import nn
from tqdm.auto import tqdm

from repshift_fx import compress
from repshift_fx.config import DISTANCES, SITES
from repshift_fx.apps.data.datasets import Dataset, to_model_input
from repshift_fx.errors import ConfigError, RepShiftError
from repshift_fx.apps.evaluation.tome import tome_r
from repshift_fx.flops import per_sample_gmacs

log = logging.getLogger("repshift_fx")
KEEPS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)


# --- what to compare ---


@dataclass(frozen=True)
class Variant:
    """One way to score: a label for tables and plots, and the compress() options it sets."""

    label: str
    options: tuple[tuple[str, str], ...]  # (("score", "shift"), ("site", "mlp"), ...)

    @property
    def kwargs(self) -> dict:
        return dict(self.options)


def _shift(site: str, distance: str, mode: str = "tokens") -> Variant:
    label = f"shift({distance})" if mode == "lines" else f"shift({site},{distance})"  # lines: one site, the block
    return Variant(label, (("score", "shift"), ("site", site), ("distance", distance)))


def all_variants(mode: str = "tokens") -> list[Variant]:
    """Shift at every site and distance, attention, norm, random; lines mode (CNNs): shift at its
    one site for every distance, norm, random."""
    if mode == "lines":
        return [_shift("mlp", d, mode) for d in DISTANCES] + [Variant(s, (("score", s),)) for s in ("norm", "random")]
    shifts = [_shift(site, d) for site in SITES for d in DISTANCES]
    return shifts + [Variant(s, (("score", s),)) for s in ("attention", "norm", "random")]


def parse_variants(text: str, mode: str = "tokens") -> list[Variant]:
    """'all', or a comma-separated list of shift[:SITE[:DISTANCE]], attention, norm, random, each
    with an optional '+merge' (reduce="merge", keys similarity) or '+merge-stream' (stream similarity),
    and tome (ToMe, r matched to each keep's FLOPs)."""
    if text.strip() == "all":
        return all_variants(mode)
    variants = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if item.endswith(("+merge", "+merge-stream")):
            stem, _, how = item.rpartition("+")
            base = parse_variants(stem, mode)[0]
            metric = (("merge_metric", "stream"),) if how == "merge-stream" else ()
            variants.append(Variant(f"{base.label}+{how}", base.options + (("reduce", "merge"),) + metric))
            continue
        if item == "tome":
            variants.append(Variant("tome", (("score", "tome"),)))
            continue
        score, *rest = item.split(":")
        if score == "shift" and len(rest) <= 2:
            site, distance = (rest + ["mlp", "l2"][len(rest):])[:2]
            if site not in SITES or distance not in DISTANCES:
                raise ConfigError(f"{item!r}: shift:SITE:DISTANCE takes a site of {SITES} and a distance of {DISTANCES}")
            variants.append(_shift(site, distance, mode))
        elif score in ("attention", "norm", "random") and not rest:
            variants.append(Variant(score, (("score", score),)))
        else:
            raise ConfigError(f"unknown score {item!r}: give all, or shift[:SITE[:DISTANCE]], attention, norm, random "
                              "(each +merge for reduce='merge'), tome")
    return variants


# --- features, probe, predictions ---


def feature_model(model: nn.Module, features: str = "pooled") -> nn.Module:
    """The module whose outputs are the features: `model` itself ("output"), or a copy without
    its classifier ("pooled"). The model passed in is not changed."""
    if features == "output":
        return model
    if features != "pooled":
        raise ConfigError(f"features must be 'pooled' or 'output', got {features!r}")
    stripped = copy.deepcopy(model)
    if hasattr(stripped, "reset_classifier"):  # timm
        stripped.reset_classifier(0)
        return stripped.eval()
    linears = [name for name, m in stripped.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear classifier to remove; use features='output'")
    parent, _, child = linears[-1].rpartition(".")
    setattr(stripped.get_submodule(parent) if parent else stripped, child, nn.Identity())
    return stripped.eval()


class LinearProbe:
    """Multinomial logistic regression on standardised features: scikit-learn's, or a torch one
    (full-batch L-BFGS, the same L2 penalty) where scikit-learn is not installed or kind="torch"."""

    def __init__(self, kind: str = "auto", c: float = 1.0, max_iter: int = 1000):
        if kind == "auto":
            try:
                import sklearn  # noqa: F401

                kind = "sklearn"
            except ImportError:
                kind = "torch"
        if kind not in ("sklearn", "torch"):
            raise ConfigError(f"probe must be 'sklearn', 'torch' or 'auto', got {kind!r}")
        self.kind, self.c, self.max_iter = kind, c, max_iter

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> "LinearProbe":
        """features (N, F), labels (N,) int."""
        if len(features) < 2 or labels.unique().numel() < 2:
            raise ConfigError(f"the probe needs training samples of at least two classes; got {len(labels)} sample(s) "
                              f"of {labels.unique().numel()} class(es): raise --train-limit, or check the data folder")
        self.mean, self.std = features.mean(0), features.std(0).clamp_min(1e-6)
        x = ((features - self.mean) / self.std).double()
        if self.kind == "sklearn":
            from sklearn.linear_model import LogisticRegression

            self.model = LogisticRegression(C=self.c, max_iter=self.max_iter).fit(x.numpy(), labels.numpy())
            return self
        classes = int(labels.max()) + 1
        self.model = nn.Linear(x.shape[1], classes).double()
        optimiser = torch.optim.LBFGS(self.model.parameters(), max_iter=self.max_iter, line_search_fn="strong_wolfe")

        def loss():
            optimiser.zero_grad()
            value = nn.functional.cross_entropy(self.model(x), labels, reduction="sum")
            value = value + 0.5 / self.c * self.model.weight.square().sum()
            value.backward()
            return value

        optimiser.step(loss)
        return self

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """(N, F) -> (N,) int64 class indices."""
        x = ((features - self.mean) / self.std).double()
        if self.kind == "sklearn":
            return torch.from_numpy(self.model.predict(x.numpy())).long()
        with torch.no_grad():
            return self.model(x).argmax(1)


@torch.no_grad()
def run_model(fn, data: Dataset, shape, mean, std, batch: int = 64, desc: str = "", progress: bool = True,
              leave: bool = True) -> torch.Tensor:
    """fn's outputs on every sample of `data`, resized to shape (C, H, W) and normalised: (N, F)."""
    outputs = []
    for start in tqdm(range(0, len(data), batch), desc=desc, disable=not progress, leave=leave, unit="batch"):
        images = data.images(range(start, min(start + batch, len(data))))
        out = fn(to_model_input(images, shape, mean, std))
        outputs.append((out[0] if isinstance(out, (tuple, list)) else out).flatten(1).float())
    return torch.cat(outputs)


# --- the unpruned model, once ---


class Scoring:
    """Predictions and scores of a setup: its probe (or argmax), its unpruned reference predictions,
    its test labels; `accuracy` is None where it is not measured."""

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        return self.probe.predict(outputs) if self.probe is not None else outputs.argmax(1)

    def scores(self, outputs: torch.Tensor) -> tuple[float | None, float]:
        """(accuracy or None, agreement with the unpruned predictions)."""
        predicted = self.predict(outputs)
        agreement = (predicted == self.reference).double().mean().item()
        if self.accuracy is None:
            return None, agreement
        return (predicted == self.test.labels).double().mean().item(), agreement


@dataclass
class Setup(Scoring):
    """Everything the sweep reuses: the unpruned outputs, the probe, the reference predictions."""

    model: nn.Module  # the feature model (head="probe") or the model (head="model")
    example: torch.Tensor  # (2, C, H, W): what compress() traces with
    shape: tuple[int, int, int]
    mean: tuple
    std: tuple
    test: Dataset
    head: str
    batch: int
    probe: LinearProbe | None
    reference: torch.Tensor  # (N,) the unpruned predictions on the test split
    gflops: float
    accuracy: float | None
    progress: bool = True
    seed: int = 0
    notes: list[str] = field(default_factory=list)
    unit: ClassVar[str] = "images"
    options_per_batch: ClassVar[bool] = False  # one example shape: evaluate_options takes one dict of options


def cache_key(**parts) -> str:
    """A file name for the unpruned outputs of one model, data set, split and limit."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16] + ".pt"


def cached(compute, cache: Path | None, what: str, **key) -> torch.Tensor:
    """compute(), or what an earlier call with the same `key` saved under `cache` (None: no cache)."""
    path = cache / cache_key(**key) if cache else None
    if path is not None and path.exists():
        log.info("unpruned %s outputs from the cache %s", what, path)
        return torch.load(path, weights_only=True)
    outputs = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(outputs, path)
    return outputs


def _cached_outputs(model, data: Dataset, setup_args: dict, cache: Path | None, what: str, progress: bool):
    def compute():
        return run_model(model, data, setup_args["shape"], setup_args["mean"], setup_args["std"],
                         setup_args["batch"], f"unpruned ({what})", progress)

    return cached(compute, cache, what, data=data.name, n=len(data), **setup_args)


def prepare(loaded, train: Dataset | None, test: Dataset, *, head: str = "probe", features: str = "pooled",
            probe: str = "auto", batch: int = 64, cache: str | Path | None = None, cache_id: dict | None = None,
            progress: bool = True, seed: int = 0) -> Setup:
    """Run the unpruned model on the data (or read its outputs from `cache`), fit the probe.

    `loaded`: a `repshift_fx.apps.specs.LoadedModel`; `train` is needed for head="probe"; `cache_id`:
    what else identifies the model in the cache key (spec, checkpoint, kwargs)."""
    if head not in ("probe", "model"):
        raise ConfigError(f"head must be 'probe' or 'model', got {head!r}")
    if head == "probe" and train is None:
        raise ConfigError("head='probe' needs a training split to fit the probe on")
    model = feature_model(loaded.model, features) if head == "probe" else loaded.model
    shape = tuple(loaded.input_shape[1:])
    example = torch.randn((2, *shape), generator=torch.Generator().manual_seed(seed))
    args = dict(cache_id or {}, head=head, features=features if head == "probe" else "output", shape=shape,
                mean=tuple(loaded.mean), std=tuple(loaded.std), batch=batch)
    cache = Path(cache) if cache else None
    test_out = _cached_outputs(model, test, args, cache, test.name, progress)
    notes, fitted = [], None
    if head == "probe":
        train_out = _cached_outputs(model, train, args, cache, train.name, progress)
        fitted = LinearProbe(probe).fit(train_out, train.labels)
        notes.append(f"linear probe ({fitted.kind}) on {train_out.shape[1]} features of {len(train)} {train.name} "
                     "images, fitted on the unpruned model")
    setup = Setup(model, example, shape, tuple(loaded.mean), tuple(loaded.std), test, head, batch, fitted,
                  torch.empty(0), per_sample_gmacs(model, (example,)), None, progress, seed, notes)
    setup.reference = setup.predict(test_out)
    if head == "probe" or test_out.shape[1] == len(test.classes):
        setup.accuracy = (setup.reference == test.labels).double().mean().item()
    else:
        notes.append(f"the model has {test_out.shape[1]} outputs and {test.name} {len(test.classes)} classes: "
                     "only agreement is measured (use head='probe' for accuracy)")
    return setup


# --- the sweep ---


@dataclass
class EvalRow:
    score: str  # a Variant label, or "unpruned"
    keep: float
    gflops: float
    flop_ratio: float
    accuracy: float | None
    agreement: float


def options(setup_model, example, variant: Variant, keep: float, at=None, fuse: bool = False) -> dict:
    """compress() options of `variant` at `keep` (ToMe: its r at the same FLOPs instead)."""
    if variant.kwargs.get("score") == "tome":
        return dict(variant.kwargs, r=tome_r(setup_model, example, keep, at))
    return dict(variant.kwargs, keep=keep, at=at, fuse=fuse)


def evaluate(setup: Setup, variant: Variant, keep: float, at=None, fuse: bool = False) -> EvalRow:
    """Compress the model with `variant` at `keep`, run it on the test split, score it."""
    return evaluate_options(setup, variant.label, keep, options(setup.model, setup.example, variant, keep, at, fuse))


def evaluate_options(setup: Setup, label: str, keep: float, config: dict) -> EvalRow:
    """Compress the model with the compress() options `config`, run it on the test split, score it."""
    gm = compress(setup.model, setup.example, compile=False, **config)
    torch.manual_seed(setup.seed)  # random scores: the same draws on every run
    outputs = run_model(gm, setup.test, setup.shape, setup.mean, setup.std, setup.batch,
                        f"{label} keep={keep}", setup.progress, leave=False)
    gflops = per_sample_gmacs(gm, (setup.example,))
    accuracy, agreement = setup.scores(outputs)
    return EvalRow(label, keep, gflops, gflops / setup.gflops, accuracy, agreement)


def sweep(setup: Setup, variants: list[Variant], keeps=KEEPS, at=None, fuse: bool = False, run=None) -> list[EvalRow]:
    """The unpruned row, then one row per variant and keep rate below 1 (keep=1.0 is the unpruned
    model). A variant the pass refuses for this model is left out with a note in `setup.notes`.
    `run(setup, variant, keep, at, fuse) -> EvalRow` measures one (default `evaluate`, images)."""
    run = run or evaluate
    rows = [EvalRow("unpruned", 1.0, setup.gflops, 1.0, setup.accuracy, 1.0)]
    jobs = [(v, k) for v in variants for k in keeps if k < 1.0]
    refused: set[str] = set()
    for variant, keep in tqdm(jobs, desc="scores x keep rates", disable=not setup.progress, unit="model"):
        if variant.label in refused:
            continue
        try:
            rows.append(run(setup, variant, keep, at, fuse))
        except RepShiftError as err:
            refused.add(variant.label)
            setup.notes.append(f"{variant.label} left out: {err}")
            log.warning("%s left out: %s", variant.label, err)
    return rows


def format_rows(rows: list[EvalRow], fmt: str = "simple") -> str:
    table = [(r.score, f"{r.keep:.2f}", f"{r.gflops:.3f}", f"{r.flop_ratio:.3f}",
              "-" if r.accuracy is None else f"{100 * r.accuracy:.1f}", f"{100 * r.agreement:.1f}") for r in rows]
    headers = ("score", "keep", "GFLOPs", "FLOP ratio", "accuracy %", "agreement %")
    return tabulate(table, headers=headers, tablefmt=fmt, disable_numparse=True)


def rows_as_dicts(rows: list[EvalRow]) -> list[dict]:
    return [asdict(row) for row in rows]


def plot_rows(rows: list[EvalRow], path: str | Path, title: str = "") -> None:
    """Accuracy (when measured) and agreement against GFLOPs, one line per score, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = rows[0]
    panels = [("agreement", "agreement with the unpruned model (%)")]
    if base.accuracy is not None:
        panels.insert(0, ("accuracy", "accuracy (%)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    labels = list(dict.fromkeys(r.score for r in rows[1:]))
    for ax, (key, name) in zip(axes[0], panels):
        for label in labels:
            points = sorted(((r.gflops, 100 * getattr(r, key)) for r in rows if r.score == label), reverse=True)
            points = [(base.gflops, 100 * getattr(base, key))] + points
            style = "-" if label.startswith("shift") else "--"
            ax.plot(*zip(*points), style, marker="o", markersize=3, label=label)
        ax.plot([base.gflops], [100 * getattr(base, key)], "k*", markersize=12, label="unpruned")
        ax.set_xlabel("GFLOPs per sample")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
