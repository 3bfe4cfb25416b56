"""The zoo sweep: every model prunes, or is refused in the user's words; never a wrong model.

    python tools/zoo.py                       # the default list below -> docs/zoo.md
    python tools/zoo.py --only deit,pit -o results/zoo.md
    python tools/zoo.py --options '{"score": "tome", "merge_metric": "stream", "target_flops": 0.7}' -o /tmp/zoo.md

For each model (random weights, small inputs, compile=False): `inspect(keep=0.7)` for the FLOP
ratio, then `compress(keep=1.0)` against the model's own output (max relative error 1e-5) and
`compress(keep=0.7)` for the output shape (with `--options`, those options in place of keep=0.7, and
their amount set to nothing in place of keep=1.0: r=0 for ToMe). The outcome is "prunes" (FLOPs fall, keep=1.0 exact,
shape kept), "refused" (a RepShiftError; its message must name no node the pass inserted), or
"WRONG" / "CRASH" (a wrong answer, or an exception that is no RepShiftError): the targets are none.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import pkgutil
import re
import time

import collections
import signal
from pathlib import Path

import repshift_fx  # noqa: F401  (before timm: installs the torchvision guard)
import repshift_fx.method
import torch
from repshift_fx.apps.models.zoo import ENTRIES
from repshift_fx.capture import reuse_traces
from repshift_fx.config import Config, unreduced
from tabulate import tabulate
from tqdm import tqdm

INSERTED = re.compile(r"repshift_(score|index|keep|merge|merged|assign|size|match|metric|restore|padding|real_score)_\d")


def _inserted_functions() -> tuple[str, ...]:
    """The public functions of repshift_fx/method/*.py: what the pass inserts into the graph
    (restore_dropped, select_tokens, ...), which a refusal in the user's terms never names."""
    names = set()
    for info in pkgutil.iter_modules(repshift_fx.method.__path__):
        module = importlib.import_module(f"repshift_fx.method.{info.name}")
        names.update(name for name, value in vars(module).items() if not name.startswith("_")
                     and inspect.isfunction(value) and value.__module__ == module.__name__)
    return tuple(sorted(names))


INSERTED_FUNCTIONS = _inserted_functions()
INSERTED_FUNCTION = re.compile(r"\b(" + "|".join(INSERTED_FUNCTIONS) + r")\b")
# a value named as the capture names it: fx's node names (`getitem_1`, `attention_mask_2`, a call_module's
# path with underscores, `stages_0_blocks_0_shortcut`), or a Proxy a model's message was formatted with;
# a CaptureError's "graph node '...'" (the first value that diverges) is the exception
CAPTURED = re.compile(r"(?<!graph node )'(?:(?:getitem|add|iadd|sub|mul|truediv|cat|stack|hidden_states|attention_mask|view|reshape|"
                      r"permute|transpose|linear|softmax|matmul|layer_norm|x|arg|l_\w*)_?\d+|[a-z]\w*_\d+_\w+)'|Proxy\(")
WHERE = re.compile(r"\bblock \d|\bblocks?\b|module '|\bstage|\bin [A-Z]\w+|the model|\bforward\b")
TODO = re.compile(r"at=|mode='lines'|restore|\buse\b|\bprune\b|\bdrop (only )?(after|at|earlier)|choose|\bpass\b|"
                  r"\bmake\b|leaf module|report it", re.IGNORECASE)


def message_problems(message: str) -> list[str]:
    """How a refusal breaks the rules: it must say where (a block, stage or module), what to do (an
    `at`, lines mode, restore, ...), and name no node of the traced graph, inserted or not, nor a value
    by its capture name (`CAPTURED`: a module path and a role instead), nor a function the pass inserts
    (`INSERTED_FUNCTIONS`: its own op failing is never the model's fault; but for a CaptureError's
    "graph node '...'", the first value that diverges, which it reports)."""
    problems = []
    if INSERTED.search(message) or "repshift_" in message or INSERTED_FUNCTION.search(message):
        problems.append("names an inserted node")
    if re.search(r"(?<!graph )\bnode '", message):
        problems.append("names a graph node")
    if CAPTURED.search(message):
        problems.append("names a captured value")
    if not WHERE.search(message):
        problems.append("says not where")
    if not TODO.search(message):
        problems.append("says not what to do")
    return problems


def _first(out):
    if isinstance(out, dict):
        out = next(iter(out.values()))
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def _call(module, x):
    return module(**x) if isinstance(x, dict) else module(x)


DEFAULT_OPTIONS = {"keep": 0.7}


def check(model, x, options: dict | None = None) -> dict:
    """One model's outcome, FLOP ratio and reason; `x` a tensor or a dict of keyword tensors;
    `options` the compress() options to reduce with (default keep=0.7)."""
    options = options or DEFAULT_OPTIONS
    with torch.no_grad():
        want = _first(_call(model, x))
    try:
        with reuse_traces():  # the three calls trace the model once
            report = repshift_fx.inspect(model, x, **options)
            ratio = report.flop_ratio
            with torch.no_grad():
                full = _first(_call(repshift_fx.compress(model, x, **dataclasses.asdict(unreduced(Config(**options))),
                                                        compile=False), x))
                pruned = _first(_call(repshift_fx.compress(model, x, **options, compile=False), x))
    except repshift_fx.RepShiftError as err:
        problems = message_problems(str(err))
        return {"outcome": "refused" if not problems else f"refused ({', '.join(problems)})", "ratio": None,
                "reason": f"{type(err).__name__}: {err}"}
    except Exception as err:  # noqa: BLE001 - a crash is what the sweep is here to find
        return {"outcome": "CRASH", "ratio": None, "reason": f"{type(err).__name__}: {str(err)[:240]}"}
    error = ((full - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
    if error > 1e-5 or pruned.shape != want.shape:
        return {"outcome": "WRONG", "ratio": ratio, "reason": f"keep=1.0 relative error {error:.2g}, shape "
                f"{tuple(pruned.shape)} vs {tuple(want.shape)}"}
    warning = next((note for note in report.notes if note.startswith("nothing is pruned")), "")
    return {"outcome": "prunes" if ratio < 0.999 else "prunes nothing (warns)", "ratio": ratio, "reason": warning}


class _Timeout(BaseException):  # not an Exception: check() reports those as crashes
    pass


def _alarm(signum, frame):
    raise _Timeout()


def sweep(entries, progress: bool = True, timeout: int = 0, options: dict | None = None) -> list[tuple]:
    """(model, kind, outcome, FLOP ratio, reason) for each entry; a model still running after
    `timeout` seconds (0: no limit) is "TIMEOUT"."""
    rows = []
    signal.signal(signal.SIGALRM, _alarm)
    for entry in tqdm(entries, desc="zoo", unit="model", disable=not progress):
        try:
            model, inputs = entry.build()
        except Exception as err:  # noqa: BLE001 - a config this version does not take
            rows.append((entry.name, entry.kind, "skipped", "-", f"building it failed: {str(err)[:160]}"))
            continue
        signal.alarm(timeout)
        try:
            result = check(model, inputs, options)
        except _Timeout:
            result = {"outcome": "TIMEOUT", "ratio": None, "reason": f"still running after {timeout} s"}
        finally:
            signal.alarm(0)
        rows.append((entry.name, entry.kind, result["outcome"], "-" if result["ratio"] is None else
                     f"{result['ratio']:.3f}", result["reason"].replace("|", "/").replace("\n", " ")))
    return rows


def summary(rows) -> str:
    """Per kind: how many prune, of how many built, and every outcome's count."""
    kinds = collections.defaultdict(collections.Counter)
    for _, kind, outcome, _, _ in rows:
        kinds[kind][outcome] += 1
    lines = []
    for kind, counts in kinds.items():
        built = sum(n for o, n in counts.items() if o != "skipped")
        rest = ", ".join(f"{o} {n}" for o, n in counts.most_common() if o != "prunes")
        lines.append(f"- {kind}: {counts['prunes']} of {built} prune ({rest})")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated substrings of the model names to run")
    parser.add_argument("-o", "--out", default="docs/zoo.md")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=300, help="seconds per model (default 300)")
    parser.add_argument("--update", action="store_true", help="replace only the rows of the models run in --out")
    parser.add_argument("--options", type=json.loads, default=DEFAULT_OPTIONS,
                        help=f"compress() options as JSON (default {json.dumps(DEFAULT_OPTIONS)})")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    entries = [e for e in ENTRIES if not args.only or any(s in e.name for s in args.only.split(","))]
    start = time.time()
    rows = sweep(entries, timeout=args.timeout, options=args.options)
    how = f"{len(rows)} models in {time.time() - start:.0f} s on {args.threads} threads"
    if args.update:
        rows, how = _updated(args.out, rows, how)
    table = tabulate(rows, headers=("model", "kind", "outcome", f"FLOP ratio at {_said(args.options)}", "reason"),
                     tablefmt="github")
    text = (f"# Zoo sweep\n\n`python tools/zoo.py` (random weights, small configs and inputs "
            f"(repshift_fx/apps/models/zoo.py), {_said(args.options)}, default `at`, restore='auto', compile=False; {how}, "
            f"torch {torch.__version__})\n\n{summary(rows)}\n\n{table}\n")
    with open(args.out, "w") as f:
        f.write(text)
    print(summary(rows))


def _said(options: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in options.items())


def _updated(path: str, new: list[tuple], how: str) -> tuple[list[tuple], str]:
    """The table in `path` with the rows of `new` put in place of those of the same model."""
    text = Path(path).read_text()
    old = [tuple(cell.strip() for cell in line.split("|")[1:-1]) for line in text.splitlines()
           if line.startswith("| ") and not line.startswith("| model ")]
    fresh = {row[0]: row for row in new}
    merged = [fresh.pop(row[0], row) for row in old] + list(fresh.values())
    first = re.search(r"compile=False; (.*?)(?:; rerun since: (.*?))?, torch", text)
    sweep, earlier = (first.group(1), first.group(2)) if first else ("an earlier sweep", None)
    rerun = (earlier.split(', ') if earlier else []) + [row[0] for row in new]
    return merged, f"{sweep}; rerun since: {', '.join(dict.fromkeys(rerun))}"


if __name__ == "__main__":
    main()
