"""Does putting the tokens back before a mean over them pay? MiniLM-L6 mean-pools its last hidden
state into the sentence embedding. After a merge or a drop the pool runs on fewer tokens, each
counted once; with restore=True the tokens are put back first (a merged-away token takes the value
of the token it went into, a dropped one its value when it was dropped), so the mean counts every
original token again. This measures the shift's drop and merge and ToMe (within the shift's FLOPs)
both ways, on WordNet with the linear probe of tools/evaluate.py.

    .venv/bin/python tools/restore_pooling.py                   # 1000 test texts, 2000 for the probe
"""
import argparse

import torch
from tabulate import tabulate

import repshift_fx  # noqa: F401  (before timm)
from repshift_fx.apps import hf_specs
from repshift_fx.apps.data.datasets import load_dataset
from repshift_fx.apps.evaluation import text
from repshift_fx.apps.evaluation.tome import tome_r
from repshift_fx.capture import reuse_traces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", type=float, default=0.7)
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--train-limit", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = hf_specs.load_text_model("hf:minilm")
    setup = text.prepare(loaded, load_dataset("wordnet", "train", args.train_limit),
                         load_dataset("wordnet", "test", args.limit), cache="results/evaluate/cache")
    keep, rows = args.keep, [("unpruned", "-", "1.000", f"{100 * setup.accuracy:.1f}", "100.0")]
    settings = {"shift, drop": lambda _: dict(keep=keep), "shift, merge": lambda _: dict(keep=keep, reduce="merge"),
                "ToMe": lambda inputs: dict(score="tome", r=tome_r(setup.model, inputs, keep))}
    with reuse_traces():
        for label, options in settings.items():
            for restore in ("auto", True):
                row = text.evaluate_options(setup, label, keep, lambda inputs: dict(options(inputs), restore=restore))
                rows.append((label, restore, f"{row.flop_ratio:.3f}", f"{100 * row.accuracy:.1f}",
                             f"{100 * row.agreement:.1f}"))
    print(tabulate(rows, headers=("setting", "restore", "FLOP ratio", "accuracy %", "agreement %"), tablefmt="github"))


if __name__ == "__main__":
    main()
