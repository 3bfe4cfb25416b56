"""The `repshift-fx` command: inspect what the pass does to a model, bench it, draw shift maps.

    repshift-fx inspect timm:deit_small_patch16_224 [--keep 0.7 --at 3,6,9 | --target-flops 0.65]
                        [--site mlp --distance l2 --score shift --fuse] [--format table|json|dot] [-o FILE]
    repshift-fx bench timm:deit_small_patch16_224 [--batch 32 --threads 2 --rounds 5]
    repshift-fx shiftmap timm:deit_small_patch16_224 photo.jpg [--block 3 --keep 0.7] -o map.png
    repshift-fx shiftmap torchvision:resnet50 photo.jpg --block 4 -o lines.png      # rows and columns
    repshift-fx inspect hf:minilm --text "a dog runs"                                # Hugging Face, text
    repshift-fx shiftmap hf:minilm "a dog runs on the beach" -o words.png            # per word piece
    repshift-fx tune timm:deit_small_patch16_224 --data fashion-mnist --target-flops 0.7 -o tuned.json
    repshift-fx inspect|bench timm:deit_small_patch16_224 --config tuned.json       # the tuned options

Bad input (an unknown model, an unreadable or ill-fitting checkpoint, a malformed --input,
--at out of range, --target-flops out of reach, ...) is one line on stderr and exit code 2;
--debug shows the traceback. Usage and the JSON keys: docs/cli.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import repshift_fx

from repshift_fx.apps import export_cmd
from repshift_fx.apps import shiftmap
from repshift_fx.apps import specs
from repshift_fx.apps.config_flags import add_config_flags, config_options, fill_defaults
from repshift_fx.config import option_names
from repshift_fx.errors import RepShiftError

log = logging.getLogger("repshift_fx")
PROG = "repshift-fx"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line (exit 2) instead of usage + message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


MODEL_FIELDS = ("site", "distance", "residual")  # how the shift is measured: shiftmap's too


def _model_options(parser: argparse.ArgumentParser) -> None:
    _spec_options(parser)
    add_config_flags(parser, MODEL_FIELDS)


def _spec_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", metavar="SPEC", help="timm:NAME, torchvision:NAME, hf:minilm, hf:DIR (a "
                        "save_pretrained directory) or module.path:factory")
    parser.add_argument("--checkpoint", metavar="FILE", help="state dict to load (.safetensors, or torch.save "
                        "read with weights_only=True); default: random weights")
    parser.add_argument("--input", metavar="SHAPE", help="example input shape, e.g. 1x3x224x224 (default: "
                        "from the model's config)")
    parser.add_argument("--kwargs", metavar="JSON", help="keyword arguments for the model factory, e.g. "
                        "'{\"img_size\": 224}'")
    parser.add_argument("--text", metavar="TEXT", action="append", help="text models (hf:): the input text "
                        "(repeat for several; cycled to the batch size)")
    parser.add_argument("--text-file", metavar="FILE", help="text models: one input text per line")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the pass does")


def _schedule_options(parser: argparse.ArgumentParser) -> None:
    """A flag for every other field of Config (repshift_fx/apps/config_flags.py), and --config."""
    add_config_flags(parser, [f for f in option_names() if f not in MODEL_FIELDS], exclusive=("keep", "target_flops"))
    parser.add_argument("--config", metavar="JSON", help="the options `repshift-fx tune` saved (all of them: "
                        "not with the option flags above)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"{PROG} {repshift_fx.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    inspect = commands.add_parser("inspect", help="blocks, token counts, attention and GFLOPs before/after")
    _model_options(inspect)
    _schedule_options(inspect)
    inspect.add_argument("--format", choices=("table", "json", "dot"), default="table")
    inspect.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    inspect.set_defaults(run=run_inspect)

    bench = commands.add_parser("bench", help="img/s of the baseline and the compressed model, eager and compiled")
    _model_options(bench)
    _schedule_options(bench)
    bench.add_argument("--batch", type=int, default=32, help="batch size (default 32; replaces --input's first size)")
    bench.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    bench.add_argument("--rounds", type=int, default=5, help="timed rounds, interleaved (default 5)")
    bench.add_argument("--no-overhead", action="store_true", help="skip the fixed-token variant that measures "
                       "what scoring and gather cost")
    bench.add_argument("--format", choices=("table", "json"), default="table")
    bench.add_argument("--onnx", action="store_true", help="time the compressed against the unpruned model, both "
                       "exported to ONNX, in onnxruntime (CPU)")
    bench.set_defaults(run=run_bench)

    draw = commands.add_parser("shiftmap", help="the shift of one block over an image (per token, or per row and "
                               "column of a CNN map), and what is kept")
    _model_options(draw)
    draw.add_argument("image", metavar="IMAGE|TEXT", help="an image file PIL can read; for a text model (hf:), "
                      "the text")
    draw.add_argument("--block", type=int, default=3, help="the block whose shift is drawn (default 3)")
    draw.add_argument("--keep", type=float, default=0.7, help="keep rate for the kept panel (default 0.7)")
    add_config_flags(draw, ["mode"])
    draw.add_argument("--scale", type=int, default=2, help="pixels per input pixel (default 2)")
    draw.add_argument("-o", "--output", metavar="PNG", default="shiftmap.png", help="output file (default shiftmap.png)")
    draw.set_defaults(run=run_shiftmap)

    tune = commands.add_parser("tune", help="choose the options from a data set's training images or texts "
                               "(no labels) under a FLOP or speed target; save them for --config")
    _spec_options(tune)
    tune.add_argument("--data", required=True, help="fashion-mnist, skimage (photos), folder:PATH, or wordnet "
                      "(text, for hf:minilm / hf:DIR)")
    tune.add_argument("--target-flops", type=float, metavar="R", help="FLOP budget in (0, 1]")
    tune.add_argument("--target-speedup", type=float, metavar="S", help="speed target, compiled to compiled (> 1)")
    tune.add_argument("--samples", type=int, default=256, help="calibration samples (default 256)")
    tune.add_argument("--batch", type=int, default=32, help="batch size (default 32; the speed is timed at it)")
    tune.add_argument("--max-candidates", type=int, default=40, help="the most candidates measured (default 40)")
    tune.add_argument("--labels", action="store_true", help="task-aware: choose by accuracy on the training "
                      "samples' labels (the head's, or a probe's on the outputs); default: by fidelity, no labels")
    tune.add_argument("--plot", metavar="PNG", help="also draw the agreement-vs-FLOPs frontier")
    tune.add_argument("-o", "--output", metavar="JSON", default="tuned.json", help="default tuned.json")
    tune.set_defaults(run=run_tune)
    export_cmd.add_parser(commands, _model_options, _schedule_options, run_export)
    return parser


def run_export(args) -> int:
    return export_cmd.run_export(args, _schedule(args), _model_input)


def run_tune(args) -> int:
    from repshift_fx.apps.tune import run_tune as tune

    return tune(args)


def _schedule(args) -> dict:
    """compress()/inspect() options from the command line (or from --config)."""
    flags = config_options(args)
    if args.config:
        from repshift_fx.apps.tune import config_from

        if flags:
            given = ", ".join("--" + k.replace("_", "-") for k in flags)
            raise specs.SpecError(f"--config {args.config} gives every option; {given} would be ignored beside it: "
                                  "drop the flag, or leave --config out and give every option as a flag")
        config, args.config_note = config_from(args.config)
        return config
    return flags


def _emit(text: str, output: str | None) -> None:
    if not output:
        print(text)
        return
    try:
        Path(output).write_text(text if text.endswith("\n") else text + "\n")
    except OSError as err:
        raise specs.SpecError(f"cannot write {output!r}: {err.strerror or err}") from None
    print(f"wrote {output}", file=sys.stderr)


def _model_input(args, loaded):
    """The example input: random images, or the --text / --text-file texts for a text model."""
    texts = list(args.text or [])
    if args.text_file:
        try:
            texts += [line.strip() for line in Path(args.text_file).read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise specs.SpecError(f"cannot read --text-file {args.text_file!r}: {err}") from None
        if not texts:
            raise specs.SpecError(f"--text-file {args.text_file!r} holds no text")
    if texts and loaded.tokenizer is None:
        raise specs.SpecError(f"--text is for text models (hf:minilm, hf:DIR); {args.spec} takes images")
    return specs.model_input(loaded, texts)


def _at_least_one(args, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise specs.SpecError(f"--{name} must be a whole number >= 1, got {getattr(args, name)}")


def run_inspect(args) -> int:
    loaded = specs.load_model(args.spec, checkpoint=args.checkpoint, input_shape=args.input, kwargs=args.kwargs)
    inputs = _model_input(args, loaded)
    report = repshift_fx.inspect(loaded.model, inputs, **_schedule(args))
    if args.config:
        report.notes.append(args.config_note)
    if args.format == "json":
        fields = report.to_dict()
        data = {"schema": fields.pop("schema", None), "spec": args.spec, "input": _shape(inputs), **fields}
        text = json.dumps(data, indent=2)
    elif args.format == "dot":
        text = report.to_dot()
    else:
        text = f"{args.spec}, input {specs.describe_input(inputs)}\n{report}"
    _emit(text, args.output)
    return 0


def _shape(inputs) -> list[int]:
    return list((inputs[0] if isinstance(inputs, tuple) else inputs).shape)


def run_bench(args) -> int:
    from repshift_fx.apps.bench import format_table, rows_as_dicts, run_benchmark, run_onnx_benchmark

    _at_least_one(args, "batch", "threads", "rounds")
    loaded = specs.load_model(args.spec, checkpoint=args.checkpoint, input_shape=args.input, kwargs=args.kwargs,
                              batch=args.batch)
    inputs = _model_input(args, loaded)
    rows = (run_onnx_benchmark if args.onnx else run_benchmark)(
        loaded.model, inputs, rounds=args.rounds, threads=args.threads, progress=True, overhead=not args.no_overhead,
        **_schedule(args))
    if args.format == "json":
        print(json.dumps({"spec": args.spec, "input": _shape(inputs), "threads": args.threads,
                          "rounds": args.rounds, "rows": rows_as_dicts(rows)}, indent=2))
    else:
        print(f"{args.spec}, input {specs.describe_input(inputs)}, {args.threads} threads, "
              f"{args.rounds} rounds interleaved, medians")
        if args.config:
            print(args.config_note)
        print(format_table(rows))
    return 0


def run_shiftmap(args) -> int:
    loaded = specs.load_model(args.spec, checkpoint=args.checkpoint, input_shape=args.input, kwargs=args.kwargs,
                              batch=1)
    fill_defaults(args, ("distance", "site", "mode"))
    config = {"distance": args.distance, "residual": args.residual}
    if loaded.tokenizer is not None:
        x, photo = _one_text(args, loaded), None
    else:
        x, photo = _one_image(args, loaded)
    if args.mode != "lines":
        config["site"] = args.site
    if args.mode != "auto":
        config["mode"] = args.mode
    gm, values = shiftmap.rewritten_values(loaded.model, x, args.block, keep=args.keep, **config)
    smap = shiftmap.read_map(gm, values, args.block, x, loaded.tokenizer, args.distance)
    lines = gm.report.mode == "lines"  # rows and columns are scored across the block: no site
    title = f"line shift at block {args.block} ({args.distance})" if lines else \
        f"shift at block {args.block} ({args.site}, {args.distance})"
    picture = shiftmap.draw(smap, photo, scale=args.scale, title=title if photo else f"{title}; {smap.kept_text}")
    try:
        picture.save(args.output)
    except (OSError, ValueError) as err:
        raise specs.SpecError(f"cannot write {args.output!r}: {err}") from None
    if isinstance(smap, shiftmap.TextMap):
        print(smap.line())
    print(f"wrote {args.output} ({picture.width}x{picture.height}): block {args.block}, {smap.kept_text}"
          f"{' (x: dropped)' if photo is None else ''}", file=sys.stderr)
    return 0


def _one_image(args, loaded):
    if len(loaded.input_shape) != 4:
        raise specs.SpecError(f"shiftmap needs an image model (input B x C x H x W), got --input "
                              f"{'x'.join(map(str, loaded.input_shape))}")
    _at_least_one(args, "scale")
    _, channels, height, width = loaded.input_shape
    return shiftmap.load_image(args.image, (height, width), loaded.mean, loaded.std, channels)


def _one_text(args, loaded):
    if args.text or args.text_file:
        raise specs.SpecError(f"shiftmap draws one text: give it as the argument after {args.spec}, without "
                              "--text or --text-file")
    args.text = [args.image]
    return _model_input(args, loaded)


@contextlib.contextmanager
def _logging_and_warnings(args):
    """Log to stderr at the level the flags ask for; library warnings (timm, torch) only under
    --debug, since stderr is the one-line error channel. Restored on exit (tests call main)."""
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    previous = log.level
    log.addHandler(handler)
    log.setLevel(level)
    try:
        with warnings.catch_warnings():
            if not args.debug:
                warnings.simplefilter("ignore")
            yield
    finally:
        log.removeHandler(handler)
        log.setLevel(previous)


def _one_line(err: BaseException) -> str:
    """The message on one line, without the node dump torch.fx appends to errors it re-raises."""
    text = " ".join(str(err).split())
    return text.split(" While executing %")[0]


def main(argv: list[str] | None = None) -> int:
    """Entry point of `repshift-fx`; returns the exit code (0, 2 for bad input, 1 for a bug)."""
    args = build_parser().parse_args(argv)
    try:
        with _logging_and_warnings(args):
            return args.run(args)
    except RepShiftError as err:
        if args.debug:
            raise
        print(f"{PROG} {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `repshift-fx inspect ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as err:  # a bug, not bad input: say so, the traceback is one flag away
        if args.debug:
            raise
        print(f"{PROG} {args.command}: internal error: {type(err).__name__}: {_one_line(err)} "
              "(run again with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
