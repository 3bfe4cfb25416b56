"""`repshift-fx tune`: calibrate a model on a data set's training split and save the configuration.

    repshift-fx tune timm:deit_small_patch16_224 --data fashion-mnist --target-flops 0.7 -o tuned.json
    repshift-fx inspect timm:deit_small_patch16_224 --config tuned.json

Images come from --data's training split, resized and normalised as the model expects; text
(hf:minilm, hf:DIR on --data wordnet) is tokenized and batched by length. Labels are read only
with --labels (task-aware calibration: by accuracy rather than fidelity).
"""
from __future__ import annotations

import os
from pathlib import Path

import repshift_fx
from repshift_fx.apps import hf, hf_specs, specs
from repshift_fx.apps.data.datasets import DataError, TextDataset, image_batches, load_dataset
from repshift_fx.calibration import Calibration
from repshift_fx.errors import ConfigError


def load_for_tuning(args):
    """(the model, its calibration batches, their labels: one tensor per batch) for the spec and
    --data of `args`."""
    if hf_specs.is_text_spec(args.spec):
        loaded = hf_specs.load_text_model(args.spec)
        data = _split(args.data, args.samples, text=True)
        batched = hf.text_batches(loaded.tokenizer, data.texts, args.batch, loaded.max_length)
        return loaded.model, [inputs for _, inputs in batched], [data.labels[rows] for rows, _ in batched]
    loaded = specs.load_model(args.spec, checkpoint=args.checkpoint, input_shape=args.input, kwargs=args.kwargs)
    data = _split(args.data, args.samples, text=False)
    return loaded.model, image_batches(data, len(data), args.batch, tuple(loaded.input_shape[1:]), loaded.mean,
                                       loaded.std), list(data.labels.split(args.batch))


def _split(name: str, samples: int, text: bool):
    data = load_dataset(name, "train", samples)
    if isinstance(data, TextDataset) != text:
        raise DataError(f"--data {name} holds {'text' if isinstance(data, TextDataset) else 'images'}, but the model "
                        f"takes {'text' if text else 'images'}")
    if len(data) == 0:
        raise DataError(f"--data {name} has no training samples")
    return data


def _check_writable(flag: str, path) -> None:
    """A file `path` can be written (its folder created), else a SpecError naming `flag`."""
    if not path:
        return
    target = Path(path).expanduser()
    if target.is_dir():
        raise specs.SpecError(f"{flag} {path}: is a folder; give a file name in it")
    folder = next((p for p in target.parents if p.exists()), Path("."))
    if not os.access(folder, os.W_OK) or not folder.is_dir():
        raise specs.SpecError(f"{flag} {path}: cannot write in {folder}")


def run_tune(args) -> int:
    if args.samples < 1 or args.batch < 1:
        raise ConfigError("--samples and --batch must be whole numbers >= 1")
    for flag, path in (("-o", args.output), ("--plot", args.plot)):
        _check_writable(flag, path)  # before the calibration, not after it
    model, batches, labels = load_for_tuning(args)
    cal = repshift_fx.calibrate(model, batches, target_flops=args.target_flops, target_speedup=args.target_speedup,
                                labels=labels if getattr(args, "labels", False) else None,
                                max_candidates=args.max_candidates, progress=True)
    cal.save(args.output)
    if args.plot:
        cal.plot(args.plot, f"{args.spec} on {args.data}")
    print(cal)
    print(f"wrote {args.output}; use it with: repshift-fx inspect {args.spec} --config {args.output}")
    return 0


def config_from(path: str) -> tuple[dict, str]:
    """compress() options from a saved calibration, and the line that says where they came from."""
    cal = Calibration.load(path)
    return dict(cal.config), f"configuration from calibration {path}: {cal.summary()}"
