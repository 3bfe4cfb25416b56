"""Does calibration pay on held-out data? Every candidate of one calibration, and the baselines at
its FLOP target, measured on the test split.

    batches = image_batches(setup, train, 256)           # or text_batches(loaded, setup, train, 256)[0]
    cal = repshift_fx.calibrate(setup.model, batches, target_flops=0.7)
    rows, rho = evaluate_calibration(setup, cal, images.evaluate_options)

The calibration batches come from the training split, disjoint from the test split. Rows:
the unpruned model, the chosen configuration, the paper's rule, ToMe and random scores at the
same target, and every other candidate; `rho` is the rank correlation (Spearman) between the calibration objective
and the test accuracy over the candidates.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.stats import spearmanr
from tabulate import tabulate
from tqdm.auto import tqdm

from repshift_fx.apps import hf
from repshift_fx.apps.data import datasets
from repshift_fx.apps.evaluation.images import EvalRow, Setup
from repshift_fx.apps.evaluation.text import TextSetup
from repshift_fx.calibration.measure import padding_share
from repshift_fx.errors import RepShiftError


@dataclass
class CalibratedRow:
    role: str  # "unpruned", "chosen", "paper", "tome", "random" (comma-joined where several), "" (another candidate)
    label: str
    objective: float | None  # on the calibration batches
    row: EvalRow  # on the test split
    samples: int = 0  # how many calibration samples `objective` is over (the screening ones, or all)


def image_batches(setup, train, samples: int) -> list:
    """The first `samples` training images as model inputs, in batches of `setup.batch`."""
    return datasets.image_batches(train, samples, setup.batch, setup.shape, setup.mean, setup.std)


def calibration_texts(train, samples: int) -> tuple[list[str], torch.Tensor]:
    """`samples` training texts drawn at random (seed 0), and their labels: the text splits are
    ordered by category (the first 256 WordNet definitions hold 3 of 41 categories)."""
    rows = sorted(torch.randperm(len(train.texts), generator=torch.Generator().manual_seed(0))[:samples].tolist())
    return [train.texts[i] for i in rows], train.labels[rows]


def text_batches(loaded, setup: TextSetup, train, samples: int) -> tuple[list, list]:
    """(`calibration_texts` tokenized and batched by length, as `setup`'s test texts are; their labels,
    one tensor per batch). The batches are the largest, up to the test's batch size, whose padding share
    is at most the test batches': padding counts in the FLOPs, and on batches mostly padding a
    reduction that drops it wins for free (on MiniLM, 256 texts in batches of 250 are 63% padding,
    the test's 5000 in batches of 250 are 20%)."""
    texts, labels = calibration_texts(train, samples)
    target = padding_share([inputs for _, inputs in setup.batches])
    for size in range(setup.batch, 0, -1):
        batched = hf.text_batches(loaded.tokenizer, texts, size, loaded.max_length)
        if padding_share([inputs for _, inputs in batched]) <= target:
            break
    return [inputs for _, inputs in batched], [labels[rows] for rows, _ in batched]


def evaluate_calibration(setup, cal, evaluate_options, progress: bool = True
                         ) -> tuple[list[CalibratedRow], float]:
    """The rows above, and Spearman's rho between objective and test accuracy (or agreement where
    accuracy is not measured) over the candidates."""
    target = cal.chosen.options["target_flops"]
    unpruned = EvalRow("unpruned", 1.0, setup.gflops, 1.0, setup.accuracy, 1.0)
    rows = [CalibratedRow("unpruned", "unpruned", None, unpruned)]
    for c in tqdm([c for c in cal.table if c.error is None], desc="candidates on the test split",
                  disable=not progress, unit="candidate"):
        try:
            row = _evaluate_candidate(setup, c, target, evaluate_options)
        except RepShiftError as error:  # another shape of the test split (text lengths) may refuse it
            setup.notes.append(f"{c.label} left out on the test split: {error}")
            continue
        roles = [r for r in ("chosen", "paper") if r in c.role] + (["tome"] if c.options.get("score") == "tome" else [])
        rows.append(CalibratedRow(", ".join(roles), c.label, c.value, row, c.samples))
    for baseline in ("tome", "random"):  # at the same FLOP target; ToMe where the model has tokens
        if not any(baseline in r.role for r in rows):
            row = _baseline(setup, evaluate_options, baseline, target)
            if row is not None:
                rows.append(CalibratedRow(baseline, f"score={baseline}", None, row))
    candidates = [r for r in rows if r.objective is not None]
    key = "accuracy" if setup.accuracy is not None else "agreement"
    rho = spearmanr([r.objective for r in candidates], [getattr(r.row, key) for r in candidates]).statistic
    order = {"unpruned": 0, "chosen": 1, "paper": 2, "tome": 3, "random": 4, "": 5}
    rows.sort(key=lambda r: (order[r.role.split(",")[0]], -(r.objective or 0)))
    return rows, float(rho)


def _evaluate_candidate(setup, c, target: float, evaluate_options) -> EvalRow:
    """One candidate on the test split. Texts of other lengths than the calibration's: its options
    with the FLOP target resolved on each test batch (`Calibration.budget_config`, as the ToMe and
    random baselines get it, and as calibration measured it). A single input shape: its calibrated
    config."""
    if setup.options_per_batch and "target_flops" in c.options:
        return evaluate_options(setup, c.label, target, c.budget_options)
    return evaluate_options(setup, c.label, target, c.config)


def _baseline(setup: Setup | TextSetup, evaluate_options, score: str, target: float):
    """The baseline `score` at `target` on the test split (texts: resolved on each batch, the deepest
    schedule where a batch cannot reach it); None, with a note, where the model refuses it."""
    options = {"score": score, "target_flops": target}
    try:
        return evaluate_options(setup, f"score={score}", target, options)
    except RepShiftError as error:
        setup.notes.append(f"score={score} left out on the test split: {error}")
        return None


def format_calibrated(rows: list[CalibratedRow], objective: str, fmt: str = "simple") -> str:
    table = [(r.role, r.label, f"{r.row.flop_ratio:.3f}", "-" if r.objective is None else f"{r.objective:.4f}",
              r.samples or "-", "-" if r.row.accuracy is None else f"{100 * r.row.accuracy:.1f}",
              f"{100 * r.row.agreement:.1f}") for r in rows]
    headers = ("", "configuration", "FLOP ratio", f"calibration {objective}", "over samples", "test accuracy %",
               "test agreement %")
    return tabulate(table, headers=headers, tablefmt=fmt, disable_numparse=True)


def plot_calibrated(rows: list[CalibratedRow], path, title: str = "") -> None:
    """Test accuracy (or agreement) against the FLOP ratio: every candidate, the unpruned model,
    the paper's rule, ToMe and the chosen configuration marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "accuracy" if rows[0].row.accuracy is not None else "agreement"
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    others = [r for r in rows if r.role == ""]
    ax.scatter([r.row.flop_ratio for r in others], [100 * getattr(r.row, key) for r in others], s=14, color="0.6",
               label="other candidates")
    marks = {"unpruned": ("k*", "unpruned"), "paper": ("s", "paper's rule"), "tome": ("D", "ToMe"),
             "random": ("v", "random"), "chosen": ("*", "calibrated")}
    for role, (marker, name) in marks.items():
        for r in (r for r in rows if role in r.role.split(", ")):
            ax.plot([r.row.flop_ratio], [100 * getattr(r.row, key)], marker[-1], markersize=11,
                    color="black" if role == "unpruned" else None, label=name)
    ax.set_xlabel("FLOP ratio (after / before)")
    ax.set_ylabel(f"test {key} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
