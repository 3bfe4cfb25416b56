"""`repshift-fx export SPEC -o model.onnx`: the compressed model as one ONNX file.

    repshift-fx export timm:deit_small_patch16_224 -o deit_small.onnx [--keep 0.7 | --config tuned.json]

The batch axis stays dynamic (--static-batch fixes it); the token counts are those of the example
input (--input, or the model's default size). The file is checked in onnxruntime against the eager
compressed graph before it replaces anything at -o (--no-check skips it).
"""
from __future__ import annotations

import sys

import repshift_fx
from repshift_fx.apps import specs


def add_parser(commands, model_options, schedule_options, run) -> None:
    """The `export` subcommand on `commands` (argparse subparsers); `model_options` and
    `schedule_options` add the options every command shares; `run(args)` runs it."""
    export = commands.add_parser("export", help="write the compressed model as ONNX (dynamic batch), checked in "
                                 "onnxruntime")
    model_options(export)
    schedule_options(export)
    export.add_argument("-o", "--output", metavar="ONNX", required=True, help="the .onnx file to write")
    export.add_argument("--batch", type=int, default=1, help="example batch size (default 1; the ONNX batch axis "
                        "is dynamic unless --static-batch)")
    export.add_argument("--static-batch", action="store_true", help="fix the batch axis to --batch")
    export.add_argument("--no-check", action="store_true", help="skip the onnxruntime check against the eager "
                        "compressed graph")
    export.set_defaults(run=run)


def run_export(args, config: dict, model_input) -> int:
    """Load SPEC, export it with `config` (compress options), print where it went.
    `model_input(args, loaded)`: the example input for the loaded model."""
    if args.batch < 1:
        raise specs.SpecError(f"--batch must be a whole number >= 1, got {args.batch}")
    loaded = specs.load_model(args.spec, checkpoint=args.checkpoint, input_shape=args.input, kwargs=args.kwargs,
                              batch=args.batch)
    inputs = model_input(args, loaded)
    exported = repshift_fx.export(loaded.model, inputs, args.output, dynamic_batch=not args.static_batch,
                                  check=not args.no_check, **config)
    if getattr(args, "config_note", None):
        print(args.config_note)
    print(describe(exported))
    print(f"wrote {exported.path}", file=sys.stderr)
    return 0


def describe(exported) -> str:
    """Tokens per block, the ONNX inputs and outputs, and the check's error, in a few lines."""
    report = exported.report
    tokens = " -> ".join(str(n) for n in _token_counts(report))
    checked = "not checked" if exported.max_error is None else f"onnxruntime vs eager: relative error " \
        f"{exported.max_error:.1e}"
    size = exported.path.stat().st_size / 2**20
    return (f"{exported.path} ({size:.1f} MiB): {report.mode} mode, {tokens} {_unit(report)}\n"
            f"inputs {', '.join(exported.input_names)}; outputs {', '.join(exported.output_names)}; {checked}")


def _token_counts(report) -> list:
    """The count entering the first block, then after every drop (lines mode: rows x cols grids)."""
    rows = report.blocks
    if not rows:
        return []
    if report.mode == "lines":
        grids = [rows[0].grid_in] + [row.grid_out for row in rows if row.scored]
        return ["x".join(map(str, grid)) for grid in grids]
    return [rows[0].tokens_in] + [row.tokens_out for row in rows if row.scored]


def _unit(report) -> str:
    return "rows x cols" if report.mode == "lines" else "tokens"
