"""Property-based tests (hypothesis): whatever a user passes, compress(), inspect(), calibrate() and
the command either work, keeping the invariants (the output's shape, the user's model unchanged,
no more FLOPs than the unpruned model, keep=1.0 exact), or refuse with a RepShiftError that names
the offending option; never another exception. The options are drawn from each one's domain and
beyond it: floats outside (0, 1], NaN, wrong types, sequences of the wrong length, unsorted or
repeated `at`, r beyond half the tokens, unknown strings, booleans as strings.

Profiles (tests/conftest.py): "ci" by default (few examples, the same on every run); many with
`pytest tests/test_properties.py --hypothesis-profile=long`.
"""
import math
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import event, example, given, note, settings
from hypothesis import strategies as st

import repshift_fx
from conftest import assert_close, assert_unchanged, snapshot, tiny_timm
from repshift_fx import ConfigError, RepShiftError
from repshift_fx.capture import reuse_traces
from repshift_fx.config import CHOICES, SWITCHES, option_names

TOKENS = 5  # 4 patches of a 32 px image and the CLS token
DEPTH = 4


class Tiny(tuple):
    """(model, example, its output, snapshot), shown in a falsifying example by name alone."""

    def __repr__(self) -> str:
        return "tiny"


@pytest.fixture(scope="module")
def tiny():
    """A 4-block DeiT on 32 px images, its example, its output, and what must stay as it is. The
    traces are shared by every example drawn (the model never changes)."""
    model = tiny_timm("deit_tiny_patch16_224", depth=DEPTH, img_size=32)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x)
    with reuse_traces():
        yield Tiny((model, x, want, snapshot(model)))


# --- the options' domains, and beyond ---

RATE = st.floats(0, 1, exclude_min=True)
BAD_RATE = st.one_of(st.floats(max_value=0), st.floats(min_value=1, exclude_min=True), st.just(math.nan),
                     st.text(max_size=4), st.booleans(), st.sampled_from(["0.5", "1"]))
BAD_WORD = st.one_of(st.text(max_size=8), st.integers(-2, 3), st.none(), st.booleans(),
                     st.sampled_from(["MLP", "L2", "auto ", "tokens,lines", "attn|mlp"]))
BOOL_LIKE = st.one_of(st.sampled_from(["yes", "no", "True", "False", "1", "0", "", "on"]), st.integers(0, 1),
                      st.none(), st.floats(allow_nan=True))
BLOCK = st.integers(0, DEPTH - 1)

VALID = {
    "keep": st.one_of(st.none(), RATE, st.just(1.0), st.lists(RATE, min_size=1, max_size=3).map(tuple)),
    "at": st.one_of(st.none(), BLOCK, st.lists(BLOCK, min_size=1, max_size=DEPTH, unique=True).map(sorted).map(tuple)),
    **{name: st.sampled_from(values) for name, values in CHOICES.items()},
    **{name: st.booleans() for name in SWITCHES},
    "restore": st.sampled_from(["auto", True, False]),
    "protect": st.one_of(st.just("auto"), st.integers(0, TOKENS - 1)),
    "target_flops": st.one_of(st.none(), st.floats(0.5, 1)),
    "r": st.one_of(st.none(), st.integers(0, 2), st.lists(st.integers(0, 1), min_size=1, max_size=DEPTH).map(tuple)),
    "shift_guidance": st.one_of(st.just(0.0), st.floats(0, 1)),
}
BEYOND = {  # each alone (with what it needs: r, score="tome") is refused, naming the option
    "keep": st.one_of(BAD_RATE, st.lists(BAD_RATE, min_size=1, max_size=3).map(tuple), st.just(()),
                      st.lists(RATE, min_size=DEPTH, max_size=6).map(tuple)),
    "at": st.one_of(st.integers(DEPTH, 50), st.integers(-5, -1), st.floats(), st.text(min_size=1, max_size=4),
                    st.just(()), st.booleans(),
                    st.lists(BLOCK, min_size=2, max_size=4).filter(lambda a: a != sorted(set(a))).map(tuple)),
    **{name: BAD_WORD.filter(lambda v, ok=values: v not in ok) for name, values in CHOICES.items()},
    **{name: BOOL_LIKE for name in SWITCHES},
    "restore": st.one_of(st.text(max_size=6).filter(lambda v: v != "auto"), st.integers(-2, 3), st.none(),
                         st.sampled_from(["Auto", "true", "on"])),
    "protect": st.one_of(st.integers(-5, -1), st.integers(TOKENS, 100), st.floats(), st.booleans(), st.none(),
                         st.text(max_size=4).filter(lambda v: v != "auto")),
    "target_flops": st.one_of(st.floats(max_value=0), st.floats(min_value=1, exclude_min=True), st.just(math.nan),
                              st.text(max_size=4), st.booleans()),
    "r": st.one_of(st.integers(-5, -1), st.integers(TOKENS // 2 + 1, 100), st.floats(), st.booleans(),
                   st.text(max_size=3), st.just(()), st.lists(st.integers(0, 1), min_size=DEPTH + 1, max_size=6)
                   .map(tuple)),
    "shift_guidance": st.one_of(st.floats(max_value=0, exclude_max=True), st.just(math.inf), st.just(math.nan),
                                st.text(max_size=3), st.booleans()),
}
assert set(VALID) == set(BEYOND) >= set(option_names())  # a new option gets its domains here
VALID, BEYOND = ({k: v for k, v in domain.items() if k in option_names()} for domain in (VALID, BEYOND))


def options(domain: dict):
    """Some of the options (each present or not), drawn from `domain`."""
    return st.fixed_dictionaries({}, optional=domain)


ANYTHING = options({name: st.one_of(VALID[name], BEYOND[name]) for name in VALID})


def attempt(run, tiny, config: dict):
    """run()'s result, or None where it refused in the user's words: a ConfigError naming an option
    of `config`, or another RepShiftError (what the model cannot take); never another exception.
    The user's model is unchanged either way; the outcome is a hypothesis event."""
    note(f"config={config!r}")
    try:
        result = run()
    except ConfigError as refusal:
        event("ConfigError")
        assert any(re.search(rf"\b{name}\b", str(refusal)) for name in config), str(refusal)
        return None
    except RepShiftError as refusal:
        event(type(refusal).__name__)
        assert str(refusal) and "Traceback" not in str(refusal)
        return None
    finally:
        assert_unchanged(tiny[0], tiny[3])
    event("works")
    return result


def check_compress(tiny, config: dict) -> None:
    """compress(**config) keeps the invariants, or is refused naming an option it was given."""
    model, x, want, _ = tiny
    gm = attempt(lambda: repshift_fx.compress(model, x, compile=False, **config), tiny, config)
    if gm is None:
        return
    with torch.no_grad():
        out = gm(x)
    assert out.shape == want.shape and not out.isnan().any()
    assert all(0 < tokens <= TOKENS for tokens in gm.report.tokens), gm.report.tokens
    keeps = gm.report.config.get("keep")
    keeps = keeps if isinstance(keeps, tuple) else (keeps,)
    if gm.report.config.get("score") != "tome" and all(k == 1.0 for k in keeps):
        assert_close(out, want)  # keep=1.0 is the model


@given(config=options(VALID))
def test_compress_options_in_their_domains(tiny, config):
    check_compress(tiny, config)


@given(data=st.data(), name=st.sampled_from(sorted(BEYOND)))
def test_an_option_beyond_its_domain_is_refused_by_name(tiny, data, name):
    config = {name: data.draw(BEYOND[name], label=name)}
    if name in ("r", "shift_guidance"):  # options of ToMe: with score="tome" (and an r, for the guidance)
        config.setdefault("score", "tome")
        config.setdefault("r", 1)
    model, x, _, before = tiny
    with pytest.raises(RepShiftError) as caught:
        repshift_fx.compress(model, x, compile=False, **config)
    assert re.search(rf"\b{name}\b", str(caught.value)), str(caught.value)
    assert_unchanged(model, before)


@given(config=ANYTHING)
def test_compress_options_from_anywhere(tiny, config):
    check_compress(tiny, config)


@settings(max_examples=max(3, settings.default.max_examples // 2))
@given(config=options({k: VALID[k] for k in ("keep", "at", "site", "score", "reduce", "fuse", "target_flops")}))
def test_inspect_never_reports_more_flops_than_the_model(tiny, config):
    model, x, _, _ = tiny
    report = attempt(lambda: repshift_fx.inspect(model, x, **config), tiny, config)
    if report is None:
        return
    if any(tokens < TOKENS for tokens in report.tokens):
        assert report.flop_ratio <= 1 + 1e-9, report.flop_ratio
    else:  # nothing pruned (keep=1.0): the scoring and merging cost a little (0.03% for a merge at keep=1.0)
        assert report.flop_ratio <= 1.01, report.flop_ratio
    if config.get("target_flops") is not None and report.budget:
        assert report.flop_ratio <= config["target_flops"] + 1e-9


# --- calibrate: a bad argument is refused by name, at once ---
CALIBRATE_BEYOND = {
    "target_flops": BEYOND["target_flops"],
    "target_speedup": st.one_of(st.floats(max_value=1), st.just(float("inf")), st.just(float("nan")),
                                st.text(max_size=3), st.booleans()),
    "objective": st.text(max_size=6).filter(lambda v: v not in ("agreement", "cosine")),
    "space": st.one_of(st.just({}), st.text(max_size=3), st.dictionaries(st.sampled_from(["kepe", "mode", "fuse"]),
                                                                       st.just(("drop",)), min_size=1),
                       st.fixed_dictionaries({"reduce": st.lists(BEYOND["reduce"], min_size=1, max_size=2)}),
                       st.fixed_dictionaries({"at": st.one_of(st.text(max_size=2), st.lists(st.integers(-2, 9),
                                                                                              min_size=1, max_size=3),
                                                             st.just([(3, 1)]), st.just([]))})),
    "max_candidates": st.one_of(st.integers(max_value=0), st.text(max_size=2), st.booleans(), st.floats()),
    "labels": st.one_of(st.just(torch.zeros(3, dtype=torch.long)), st.just([torch.zeros(2)]), st.text(max_size=3)),
    **{name: BEYOND[name] for name in ("keep", "at", "site", "fuse", "protect", "restore")},  # held fixed
}


@settings(max_examples=max(4, settings.default.max_examples // 2))
@given(data=st.data(), name=st.sampled_from(sorted(CALIBRATE_BEYOND)))
def test_calibrate_refuses_a_bad_argument_by_name(tiny, data, name):
    model, x, _, before = tiny
    arguments = {"target_flops": 0.9, name: data.draw(CALIBRATE_BEYOND[name], label=name)}
    if name == "target_speedup":
        arguments.pop("target_flops")
    batches = [x, x.flip(0)]
    with pytest.raises(RepShiftError) as caught:
        repshift_fx.calibrate(model, batches, max_candidates=2, progress=False, **arguments)
    words = {"labels": "labels", "objective": "objective", "space": "space"}.get(name, name)
    assert words in str(caught.value), str(caught.value)
    assert_unchanged(model, before)


@settings(max_examples=max(2, settings.default.max_examples // 15))  # a calibration that runs: about 6 s
@given(fixed=options({k: st.one_of(VALID[k], BEYOND[k]) for k in ("site", "distance", "reduce", "at", "protect")}),
       target=st.one_of(st.floats(0.8, 1), BEYOND["target_flops"]))
@example(fixed={"reduce": "merge"}, target=0.9)  # one that calibrates, whatever is drawn
def test_calibrate_chooses_options_compress_takes_or_refuses(tiny, fixed, target):
    model, x, want, _ = tiny
    arguments = dict(fixed, target_flops=target)
    calibration = attempt(lambda: repshift_fx.calibrate(model, [x, x.flip(0)], max_candidates=2, progress=False,
                                                        **arguments), tiny, arguments)
    if calibration is not None:
        with torch.no_grad():
            assert repshift_fx.compress(model, x, compile=False, **calibration.config)(x).shape == want.shape


# --- the command: exit code 2, one line on stderr, no traceback ---

SPEC = ["timm:deit_tiny_patch16_224", "--kwargs", '{"depth": 2, "img_size": 32}', "--input", "1x3x32x32"]
FLAG_VALUES = {
    "--keep": st.one_of(st.sampled_from(["1.5", "0", "-0.2", "nan", "half", "0.5,2", ""]), st.text(
        alphabet="abc,.-", min_size=1, max_size=4)),
    "--at": st.sampled_from(["one", "2,1", "1,1", "9", "-1", "0.5", ","]),
    "--target-flops": st.sampled_from(["0", "1.5", "nan", "-1", "big"]),
    "--protect": st.sampled_from(["-1", "x", "1.5", "99"]),
    "--site": st.sampled_from(["head", "MLP", ""]),
    "--mode": st.sampled_from(["grid", "Tokens"]),
    "--restore": st.sampled_from(["yes", "True", "1"]),
    "--kepe": st.sampled_from(["0.5"]),
}


@settings(max_examples=max(3, settings.default.max_examples // 8))  # a process each: about 5 s
@given(data=st.data(), flag=st.sampled_from(sorted(FLAG_VALUES)))
def test_the_command_refuses_a_bad_flag_in_one_line(data, flag):
    value = data.draw(FLAG_VALUES[flag], label=flag)
    argv = [sys.executable, "-m", "repshift_fx.apps.cli", "inspect", *SPEC, f"{flag}={value}"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, (argv, result.stderr)
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    name = flag.lstrip("-")
    assert name in result.stderr or name.replace("-", "_") in result.stderr, result.stderr
    assert result.stdout == ""
