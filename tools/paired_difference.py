"""Is the gap between the shift's merge and ToMe on MiniLM more than the noise of the test texts?
Both run on the same 1000 WordNet texts (keep 0.7; ToMe within the shift's FLOPs, its decreasing r
schedule), scored by the linear probe of tools/evaluate.py. Printed: each accuracy, the paired
difference with a 95% bootstrap interval over the texts, and McNemar's exact test on the texts where
exactly one of the two is right.

    .venv/bin/python tools/paired_difference.py                     # restore="auto"
    .venv/bin/python tools/paired_difference.py --restore true      # tokens put back before the mean pool
"""
import argparse

import numpy as np
import torch
from scipy.stats import binomtest

import repshift_fx  # noqa: F401  (before timm)
from repshift_fx.apps import hf_specs
from repshift_fx.apps.data.datasets import load_dataset
from repshift_fx.apps.evaluation import text
from repshift_fx.apps.evaluation.images import Scoring
from repshift_fx.apps.evaluation.tome import tome_r
from repshift_fx.capture import reuse_traces


def correct_per_text(setup, label: str, keep: float, options) -> tuple[np.ndarray, float]:
    """(whether the probe is right on each test text, the FLOP ratio) for per-batch `options`."""
    predictions = []
    setup.scores = lambda outputs: (predictions.append(setup.predict(outputs)), Scoring.scores(setup, outputs))[1]
    row = text.evaluate_options(setup, label, keep, options)
    del setup.scores
    return (predictions[0] == setup.test.labels).numpy(), row.flop_ratio


def bootstrap_interval(difference: np.ndarray, draws: int = 10000, seed: int = 0) -> tuple[float, float]:
    """The 95% percentile interval of the mean of `difference` over texts drawn with replacement."""
    rng = np.random.default_rng(seed)
    means = difference[rng.integers(0, len(difference), (draws, len(difference)))].mean(1)
    return tuple(np.percentile(means, [2.5, 97.5]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", type=float, default=0.7)
    parser.add_argument("--restore", choices=("auto", "true"), default="auto")
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--train-limit", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    restore = True if args.restore == "true" else "auto"
    loaded = hf_specs.load_text_model("hf:minilm")
    setup = text.prepare(loaded, load_dataset("wordnet", "train", args.train_limit),
                         load_dataset("wordnet", "test", args.limit), cache="results/evaluate/cache", progress=False)
    with reuse_traces():
        merge, merge_flops = correct_per_text(setup, "shift, merge", args.keep,
                                              lambda _: dict(keep=args.keep, reduce="merge", restore=restore))
        tome, tome_flops = correct_per_text(setup, "ToMe", args.keep, lambda inputs: dict(
            score="tome", r=tome_r(setup.model, inputs, args.keep), restore=restore))
    low, high = bootstrap_interval(merge.astype(float) - tome.astype(float))
    only_merge, only_tome = int((merge & ~tome).sum()), int((tome & ~merge).sum())
    p = binomtest(only_merge, only_merge + only_tome).pvalue
    print(f"restore={restore}, keep {args.keep}, {len(merge)} texts")
    print(f"shift, merge: {100 * merge.mean():.1f}% at {merge_flops:.3f} of the FLOPs")
    print(f"ToMe:         {100 * tome.mean():.1f}% at {tome_flops:.3f} of the FLOPs")
    print(f"merge - ToMe: {100 * (merge.mean() - tome.mean()):+.1f} points, 95% interval "
          f"[{100 * low:+.1f}, {100 * high:+.1f}]; right only with merge {only_merge}, only with ToMe {only_tome}, "
          f"McNemar p = {p:.2f}")


if __name__ == "__main__":
    main()
