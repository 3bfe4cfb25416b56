"""Candidates measured on the user's batches: FLOPs from the rewritten graphs, outputs against the
unpruned model's (computed once).

    measure = Measure(model, batches, objective=None)
    row = measure(Candidate({"target_flops": 0.7, "reduce": "merge"}))   # row.value, row.flops

Every candidate runs eagerly (`compress(..., compile=False)`), once per distinct batch shape,
with the captures shared (`capture.reuse_traces`). Its amount (keep, or ToMe's r) is resolved on
the batch of the median sample length (`Measure.home`); on inputs of several lengths (texts) each
length resolves the FLOP target for itself, as `Calibration.budget_config` does where it is deployed.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from repshift_fx.api import compress
from repshift_fx.calibration.objective import PER_SAMPLE, call, choose_objective, cosine, main_output, output_kind
from repshift_fx.calibration.labels import Task, label_list
from repshift_fx.errors import ExampleInputError, RepShiftError, TargetOutOfReach, described
from repshift_fx.flops import count_macs
from repshift_fx.plan.default import named

log = logging.getLogger("repshift_fx")


@dataclass
class Candidate:
    """One configuration tried, and what it measured (None until measured)."""

    options: dict  # the options searched (the amount as target_flops)
    config: dict | None = None  # compress() and backend() options: the amount the planner chose (keep, or r)
    budget: float | None = None  # the FLOP target resolved on each input length, where fit() lowered it
    flops: float | None = None  # FLOPs after / before, over the batches
    value: float | None = None  # the objective (agreement or cosine), averaged over the samples
    cosine: float | None = None  # output cosine similarity (the tie-break)
    speedup: float | None = None  # compiled to compiled, on the home batch (target_speedup only)
    role: list[str] = field(default_factory=list)  # "paper", "chosen", "finalist", ...
    error: str | None = None  # why the pass refused it
    at: tuple[int, ...] | None = None  # the blocks the drops (or merges) followed
    samples: int = 0  # how many samples value and cosine are over (the screening ones, or all)
    accuracy: float | None = None  # with labels: the share of those samples it gets right
    expected: float | None = None  # with labels: the mean probability of the true class (expected accuracy)
    correct: list[bool] | None = field(default=None, repr=False)  # with labels: per sample, for paired intervals
    p_true: list[float] | None = field(default=None, repr=False)  # with labels: per sample, for the choice
    per_sample: list[float] | None = field(default=None, repr=False)  # the objective of each sample (built-in ones)
    refusal: RepShiftError | None = field(default=None, repr=False, compare=False)  # the error behind `error`

    @property
    def budget_options(self) -> dict:
        """compress() options with `at` made explicit and the amount left to the planner (target_flops),
        to be resolved again on each input."""
        at = (self.config or {}).get("at")
        budget = {} if self.budget is None else {"target_flops": self.budget}
        return {**self.options, **budget, **({"at": at} if at is not None else {})}

    @property
    def label(self) -> str:
        shown = {k: v for k, v in self.options.items() if k != "target_flops"}
        return ", ".join(f"{k}={_short(v)}" for k, v in shown.items()) or "the paper's rule"

    def rank(self) -> tuple:
        """Higher is better: measured on more samples, then the expected accuracy (with labels), the
        objective, the cosine, fewer FLOPs."""
        if self.error is not None:
            return (float("-inf"),)
        accuracy = () if self.expected is None else (self.expected,)
        return (self.samples, *accuracy, self.value, self.cosine, -self.flops)

    def fidelity(self) -> tuple:
        """Higher is closer to the unpruned model: the objective, then the cosine (never accuracy)."""
        return (float("-inf"),) if self.error is not None else (self.value, self.cosine, -self.flops)


def _short(value) -> str:
    return "(" + ",".join(map(str, value)) + ")" if isinstance(value, (tuple, list)) else str(value)


def batch_list(batches) -> list:
    """The user's batches as a list, checked: every batch a tensor, tuple of tensors or dict of
    tensors, of one structure, with one batch size within each batch and the same sample shape as
    the first batch (a dict's sequence length, the last axis, may differ)."""
    if batches is None or isinstance(batches, (str, bytes)) or not hasattr(batches, "__iter__"):
        raise ExampleInputError(f"calibrate() needs batches of example inputs (a list of tensors or of dicts of "
                                f"tensors, a few hundred samples in all); got {type(batches).__name__}")
    batches = [batches] if isinstance(batches, (torch.Tensor, Mapping)) else list(batches)
    if not batches:
        raise ExampleInputError("calibrate() needs batches of example inputs (a list of tensors or of dicts of "
                                "tensors, a few hundred samples in all); it got none")
    first = _structure(batches[0], 0)
    for i, batch in enumerate(batches[1:], 1):
        got = _structure(batch, i)
        if got != first:
            raise ExampleInputError(f"batch {i} has shape {_describe(got)}, but batch 0 has {_describe(first)}: "
                                    "every batch must give the model the same inputs (only the batch size and, for "
                                    "dict batches, the sequence length may differ)")
    return batches


def _tensors(batch, i: int) -> list[tuple[str, torch.Tensor]]:
    items = batch.items() if isinstance(batch, Mapping) else \
        enumerate(batch) if isinstance(batch, (tuple, list)) else [("input", batch)]
    items = list(items)
    bad = [str(k) for k, v in items if not isinstance(v, torch.Tensor)]
    if bad or not items:
        raise ExampleInputError(f"batch {i} holds {'no tensor' if not items else 'non-tensors at ' + ', '.join(bad)}: "
                                "give tensors, tuples of tensors or dicts of tensors")
    sizes = {v.shape[0] if v.dim() else None for _, v in items}
    if len(sizes) != 1 or None in sizes or 0 in sizes:
        raise ExampleInputError(f"batch {i} has tensors of batch sizes {sorted(map(str, sizes))}: each tensor of a "
                                "batch must hold the same samples along its first axis, at least one")
    return items


def _structure(batch, i: int) -> tuple:
    """What must match between batches: names and sample shapes (a dict's last axis free)."""
    free = isinstance(batch, Mapping)
    return tuple((str(k), tuple(v.shape[1:-1] if free else v.shape[1:]), v.dtype) for k, v in _tensors(batch, i))


def _describe(structure: tuple) -> str:
    """e.g. "input: (B, 3, 224, 224) torch.float32" (a dict's free sequence axis not shown)."""
    return "; ".join(f"{name}: {tuple(['B', *shape])} {dtype}".replace("'", "") for name, shape, dtype in structure)


def padding_share(batches: list) -> float:
    """The share of the positions of dict batches that are padding: the zeros of their
    "attention_mask" (0.0 where no batch has one)."""
    masks = [b["attention_mask"] for b in batches if isinstance(b, Mapping) and isinstance(b.get("attention_mask"),
                                                                                             torch.Tensor)]
    total = sum(m.numel() for m in masks)
    return 0.0 if total == 0 else 1.0 - sum(int(m.bool().sum()) for m in masks) / total


def shape_key(batch) -> tuple:
    return tuple((str(k), tuple(v.shape)) for k, v in _tensors(batch, 0))


def sample_shape(batch) -> tuple:
    return tuple((str(k), tuple(v.shape[1:])) for k, v in _tensors(batch, 0))


def median_batch(batches: list, sizes: list[int]) -> int:
    """The first batch of the median sample length, weighted by samples (batch 0 where every sample
    has one shape, as images do)."""
    lengths = [sum(v[:1].numel() for _, v in _tensors(b, i)) for i, b in enumerate(batches)]
    seen = 0
    for i in sorted(range(len(batches)), key=lambda i: (lengths[i], i)):
        seen += sizes[i]
        if 2 * seen >= sum(sizes):
            return lengths.index(lengths[i])
    return 0


def sample_count(batch) -> int:
    return _tensors(batch, 0)[0][1].shape[0]


def sample_macs(module, batch) -> int:
    """MACs of one sample of `batch` through `module`."""
    first = {k: v[:1] for k, v in batch.items()} if isinstance(batch, Mapping) else \
        tuple(t[:1] for t in batch) if isinstance(batch, (tuple, list)) else batch[:1]
    return count_macs(lambda: call(module, first), ())


class Measure:
    """The unpruned outputs and FLOPs, once; then each candidate's FLOP ratio and objective."""

    def __init__(self, model: nn.Module, batches, objective=None, screen: int | None = None, labels=None):
        self.model, self.batches = model, batch_list(batches)
        self.sizes = [sample_count(b) for b in self.batches]
        labels = None if labels is None else label_list(labels, self.sizes)
        outputs = unpruned_outputs(model, self.batches)
        kind = output_kind(model, self.batches[0], outputs[0])
        self.kind = "custom" if objective is not None else kind
        self.objective, self.objective_name = choose_objective(objective, self.kind if objective is None else "")
        self.per_sample = PER_SAMPLE.get(self.objective)
        self.reference = [main_output(o).float() for o in outputs]
        self.task = None if labels is None else Task.fit(kind, self.reference, labels)
        self.screening = spread(self.sizes, screen)
        self.everything = tuple(range(len(self.batches)))
        self.home = median_batch(self.batches, self.sizes)  # where a candidate's amount is resolved
        self.varied = len({sample_shape(b) for b in self.batches}) > 1  # texts of several lengths

    @property
    def samples(self) -> int:
        return sum(self.sizes)

    @functools.cache
    def _macs_before(self, which: tuple[int, ...]) -> float:
        return self._macs(lambda _: self.model, which)

    def _macs(self, module_for, which: tuple[int, ...]) -> float:
        """Sample-weighted MACs over the batches `which`; `module_for(batch)` runs one."""
        total, seen = 0.0, {}
        for i in which:
            key = shape_key(self.batches[i])
            if key not in seen:
                seen[key] = sample_macs(module_for(self.batches[i]), self.batches[i])
            total += seen[key] * self.sizes[i]
        return total

    def __call__(self, candidate: Candidate, full: bool = False) -> Candidate:
        """Fill `candidate`'s config, FLOPs and objective over the screening batches (`full`: over
        every batch); a refusal is recorded in `.error`, not raised."""
        compressed, which = {}, self.everything if full else self.screening

        def module_for(batch):
            key = shape_key(batch)
            if key not in compressed:
                compressed[key] = self._compress(candidate, batch)
            return compressed[key]

        try:
            if candidate.config is None:
                home = self.batches[self.home]
                if self.varied:
                    gm = compress_within_reach(self.model, home, candidate.budget_options)[0]
                else:
                    gm = compress(self.model, home, compile=False, **named(candidate.options))
                candidate.config, compressed[shape_key(home)] = concrete(gm, candidate.options), gm
                candidate.at = candidate.config.get("at")
            candidate.flops = self._macs(module_for, which) / self._macs_before(which)
            values, cosines, correct, p_true, per_sample = [], [], [], [], []
            torch.manual_seed(0)  # score="random": the same draws for every candidate
            for i in which:
                module = module_for(self.batches[i])
                with torch.inference_mode():
                    out = main_output(call(module, self.batches[i])).float()
                    values.append(self.objective(out, self.reference[i]))
                    cosines.append(cosine(out, self.reference[i]))
                    if self.per_sample is not None:
                        per_sample += self.per_sample(out, self.reference[i]).tolist()
                    if self.task is not None:
                        right, probability = self.task.scores(out, i)
                        correct += right.tolist()
                        p_true += probability.tolist()
        except RepShiftError as error:
            candidate.error, candidate.refusal = str(error).split("\n")[0], error
            log.info("calibrate: %s refused: %s", candidate.label, candidate.error)
            return candidate
        sizes = [self.sizes[i] for i in which]
        candidate.value, candidate.cosine = _weighted(values, sizes), _weighted(cosines, sizes)
        candidate.samples = sum(sizes)
        candidate.per_sample = per_sample if self.per_sample is not None else None
        if self.task is not None:
            candidate.correct, candidate.accuracy = correct, sum(correct) / len(correct)
            candidate.p_true, candidate.expected = p_true, sum(p_true) / len(p_true)
        return candidate


    def _compress(self, candidate: Candidate, batch) -> nn.Module:
        """`candidate` compressed for `batch`: its amount as resolved on the home batch, or, on inputs of
        another length, its FLOP target resolved on `batch` itself."""
        if not self.varied or "target_flops" not in candidate.options or \
                sample_shape(batch) == sample_shape(self.batches[self.home]):
            return compress(self.model, batch, compile=False, **candidate.config)
        return compress_within_reach(self.model, batch, candidate.budget_options)[0]

    def fit(self, candidate: Candidate, target: float, steps: int = 8) -> Candidate:
        """On inputs of several lengths, lower `candidate`'s FLOP target per input until its FLOPs over
        every batch are within `target`: some lengths may not reach the target, and each rounds token
        counts for itself. Re-measured on every batch."""
        step = 0.0
        for _ in range(steps):
            if candidate.error is not None or candidate.flops <= target + 1e-9 or not self.varied or \
                    "target_flops" not in candidate.options:
                break
            before, budget = candidate.flops, candidate.budget_options["target_flops"]
            step = 2 * step if step > before - target else before - target + 1e-4  # doubled after one that fell short
            candidate.budget, candidate.config = round(budget - step, 4), None
            if candidate.budget <= 0:
                break
            self(candidate, full=True)
        if candidate.error is None and candidate.flops > target + 1e-9:
            candidate.error = (f"it reaches a FLOP ratio of {candidate.flops:.4f} over the batches at best, above the "
                               f"target {target}")
        return candidate


def compress_within_reach(model: nn.Module, batch, options: dict) -> tuple[nn.Module, bool]:
    """(compress(compile=False) at the FLOP target of `options`, or, where no schedule reaches it on
    `batch` (ToMe merges at most half of a block's tokens), at the deepest schedule `batch` allows, as
    a model deployed on texts of every length would run them; whether the target was reached)."""
    options = named(options)
    try:
        return compress(model, batch, compile=False, **options), True
    except TargetOutOfReach as short:
        rest = {k: v for k, v in options.items() if k != "target_flops"}
        return compress(model, batch, compile=False, **{**rest, **short.deepest}), False


def unpruned_outputs(model: nn.Module, batches: list) -> list:
    """The model's own outputs on every batch; a batch the model cannot take is an ExampleInputError,
    as compress() gives for such an example input."""
    outputs = []
    with torch.inference_mode():
        for i, batch in enumerate(batches):
            try:
                outputs.append(call(model, batch))
            except Exception as err:  # the model's own error, whatever it raises
                shapes = ", ".join(f"{tuple(t.shape)} {t.dtype}" for _, t in _tensors(batch, i))
                raise ExampleInputError(f"batch {i} ({shapes}) does not fit {type(model).__name__}: "
                                        f"{described(err)}{_pair_hint(batch)}") from err
            compared = main_output(outputs[-1])
            if compared.is_floating_point() and not compared.isfinite().all():
                raise ExampleInputError(f"{type(model).__name__}'s output on batch {i} holds NaN or inf: calibration "
                                        "compares the reduced model's outputs with it; pass batches it computes "
                                        "finite outputs on")
    return outputs


def _pair_hint(batch) -> str:
    """What a DataLoader of (inputs, labels) pairs needs: the inputs alone, the labels as labels=."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor) and \
            batch[1].dim() == 1 and not batch[1].is_floating_point():
        return ("; the batches look like (inputs, labels) pairs, as a DataLoader gives them: pass the inputs alone "
                "([x for x, _ in loader]) and the labels as labels= ([y for _, y in loader])")
    return ""


def spread(sizes: list[int], screen: int | None) -> tuple[int, ...]:
    """The fewest batches, evenly spaced over all of them, that hold `screen` samples (all batches
    when None): batches sorted by length (texts) are screened on short and long ones alike."""
    n = len(sizes)
    for k in range(1, n + 1):
        which = tuple(sorted({round(j * (n - 1) / max(k - 1, 1)) for j in range(k)}))
        if screen is not None and sum(sizes[i] for i in which) >= screen:
            return which
    return tuple(range(n))


def concrete(gm, options: dict) -> dict:
    """`options` with target_flops replaced by the amount `gm` was compressed with (keep, or ToMe's r)
    and `at` made explicit: options every entry point takes (the dynamo backend counts no FLOP budget),
    for the same FLOPs at `gm`'s input shape."""
    if "target_flops" not in options:
        return named(options)
    chosen = gm.report.config
    amount = {"r": chosen["r"]} if chosen.get("r") is not None else {"keep": chosen["keep"]}
    found = {k: v for k, v in named(options).items() if k != "target_flops"}
    return dict(found, **amount, at=tuple(chosen["at"]))


def _weighted(values: list[float], sizes: list[int]) -> float:
    return sum(v * n for v, n in zip(values, sizes)) / sum(sizes)
