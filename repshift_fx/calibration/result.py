"""What calibration returns: the configuration chosen, every candidate measured, the frontier plot.

    cal.config                       # compress(model, x, **cal.config), backend(**cal.config), the CLI
    cal.budget_config                # compress(model, x, **cal.budget_config): the amount resolved per input
    print(cal)                       # the table
    cal.plot("frontier.png"); cal.save("tuned.json"); Calibration.load("tuned.json")
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from tabulate import tabulate

from repshift_fx.calibration.measure import Candidate
from repshift_fx.errors import ConfigError

FORMAT = "repshift_fx.calibration/1"


@dataclass
class Calibration:
    """The chosen candidate's options (`config`), and every candidate measured (`table`)."""

    config: dict  # compress(), backend() and CLI options: the amount (keep, or ToMe's r) and at made explicit
    table: list[Candidate]
    objective: str  # "top-1 agreement", "cosine similarity" or the callable's name
    samples: int
    target_flops: float | None = None
    target_speedup: float | None = None
    notes: list[str] = field(default_factory=list)
    labelled: bool = False  # chosen by accuracy on labels (else by fidelity alone)

    @property
    def chosen(self) -> Candidate:
        return next(c for c in self.table if "chosen" in c.role)

    @property
    def budget_config(self) -> dict:
        """compress() options that resolve the amount again on each example input, within the FLOP
        target (lowered where calibration's shortest texts could not reach it): for inputs whose size
        varies (texts of other lengths), where the fixed amount of `config` lands above the target or
        is refused (ToMe's r on a text shorter than twice it). `at` and the rest as chosen; the dynamo
        backend, which counts no FLOPs, takes `config`."""
        return self.chosen.budget_options

    @property
    def paper(self) -> Candidate | None:
        return next((c for c in self.table if "paper" in c.role), None)

    def summary(self) -> str:
        """One line: what was chosen, with what agreement, at what FLOPs (and speed)."""
        c = self.chosen
        speed = f", {c.speedup:.2f}x compiled" if c.speedup is not None else ""
        accuracy = f"accuracy {100 * c.accuracy:.1f}%, " if c.accuracy is not None else ""
        return (f"calibrated on {self.samples} {'labelled ' if self.labelled else ''}samples: {c.label}; {accuracy}"
                f"{self.objective} {c.value:.4f} at FLOP ratio {c.flops:.3f}{speed} ({len(self.table)} candidates)")

    def format_table(self, fmt: str = "simple") -> str:
        rows = [(", ".join(c.role), c.label, _num(c.flops), *self._accuracy_columns(c), _num(c.value), _num(c.cosine),
                 c.samples or "-", "-" if c.speedup is None else f"{c.speedup:.2f}x", c.error or "")
                for c in sorted(self.table, key=Candidate.rank, reverse=True)]
        headers = ("", "candidate", "FLOP ratio", *(["accuracy", "expected accuracy"] if self.labelled else []),
                   self.objective, "cosine", "samples", "speedup", "refused")
        return tabulate(rows, headers=headers, tablefmt=fmt)

    def _accuracy_columns(self, c: Candidate) -> list[str]:
        return [_num(c.accuracy), _num(c.expected)] if self.labelled else []

    def __str__(self) -> str:
        return "\n".join([self.summary(), self.format_table(), *self.notes])

    def plot(self, path: str | Path, title: str = "") -> None:
        """The objective against the FLOP ratio: every candidate, the frontier, the paper's rule
        and the chosen point marked (PNG, needs matplotlib)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        measured = [c for c in self.table if c.error is None]
        frontier = pareto(measured)
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        ax.scatter([c.flops for c in measured], [c.value for c in measured], s=14, color="0.6", label="candidates")
        ax.plot([c.flops for c in frontier], [c.value for c in frontier], color="tab:blue", label="frontier")
        for who, marker, color in (("paper", "s", "tab:orange"), ("chosen", "*", "tab:red")):
            for c in (c for c in measured if who in c.role):
                ax.scatter([c.flops], [c.value], marker=marker, s=120, color=color, zorder=3,
                           label="paper's rule" if who == "paper" else "chosen")
        ax.set_xlabel("FLOP ratio (after / before)")
        ax.set_ylabel(self.objective)
        ax.set_title(title or f"calibration on {self.samples} samples", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)  # as export() does
        fig.savefig(path, dpi=120)
        plt.close(fig)

    def to_dict(self) -> dict:
        record = dataclasses.asdict(self)
        record["format"] = FORMAT
        for row in record["table"]:
            for per_sample in ("correct", "p_true"):  # for the choice, not for the record
                row.pop(per_sample)
            row.pop("refusal")
        return record

    def save(self, path: str | Path) -> None:
        """JSON for `Calibration.load` and `repshift-fx inspect --config` (its folder is created)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, default=list))

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        try:
            record = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise ConfigError(f"cannot read the calibration {str(path)!r}: {error}") from None
        if not isinstance(record, dict) or record.pop("format", None) != FORMAT:
            raise ConfigError(f"{str(path)!r} is not a calibration saved by repshift_fx (Calibration.save / "
                              "repshift-fx tune)")
        try:
            record["table"] = [Candidate(**dict(_tuples(row), options=_tuples(row["options"]),
                                                config=_tuples(row["config"] or {}))) for row in record["table"]]
            record["config"] = _tuples(record["config"])
            return cls(**record)
        except (KeyError, TypeError, AttributeError) as error:  # a file edited by hand: a field missing or wrong
            raise ConfigError(f"{str(path)!r} is not a valid calibration: {type(error).__name__}: {error}. Save it "
                              "again with Calibration.save (or repshift-fx tune), or pass the options to compress() "
                              "yourself") from None


def pareto(candidates: list[Candidate]) -> list[Candidate]:
    """The candidates no other beats on both FLOPs (fewer) and the objective (higher), by FLOPs."""
    front, best = [], float("-inf")
    for c in sorted(candidates, key=lambda c: (c.flops, -c.value)):
        if c.value > best:
            front.append(c)
            best = c.value
    return front


def _tuples(options: dict) -> dict:
    """JSON lists back to the tuples compress() options and `Candidate.at` hold."""
    return {k: tuple(v) if isinstance(v, list) and k in ("at", "keep", "r") else v for k, v in options.items()}


def _num(value) -> str:
    return "-" if value is None else f"{value:.4f}"
