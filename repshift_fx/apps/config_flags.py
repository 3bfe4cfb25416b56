"""The command's flags for compress()'s options, derived from `Config`: one per field, named after
it (`shift_guidance` -> `--shift-guidance`), with its doc as help.

From the field's type: a Literal is a choice (`--site mlp|attn|block`); a bool a switch (`--fuse`, or
`--no-sdpa` where the default is True), `on`/`off` where it is a choice too (`--restore auto|on|off`);
a float a number; a tuple comma-separated values (`--at 3,6,9`, `--keep 0.8,0.7`), one value alone
where the field also takes one (`--keep 0.7`, `--r 8`); an int beside a Literal a number or the word
(`--protect 1`).
"""
from __future__ import annotations

import argparse
import dataclasses
import typing

from repshift_fx.apps.specs import SpecError, parse_floats, parse_ints
from repshift_fx.config import CHOICES, FIXED, TYPES, Config, members

# train=True is for compress() in Python, on a model in training mode: the command loads models for inference
FIELDS = {f.name: f for f in dataclasses.fields(Config) if f.name != "train"}


def flag(name: str) -> str:
    """The flag of field `name`: `--shift-guidance`, `--no-sdpa` (a switch on by default)."""
    negated = TYPES[name] is bool and FIELDS[name].default is True
    return f"--{'no-' if negated else ''}{name.replace('_', '-')}"


def add_config_flags(parser: argparse.ArgumentParser, names=None, exclusive: tuple[str, ...] = ()) -> None:
    """A flag on `parser` for every field of Config in `names` (None: all), in Config's order; the
    fields in `exclusive` exclude each other (argparse refuses them together)."""
    group = parser.add_mutually_exclusive_group() if exclusive else parser
    for name, field in FIELDS.items():
        if names is None or name in names:
            (group if name in exclusive else parser).add_argument(flag(name), dest=name, **_argument(field))


def config_options(args: argparse.Namespace) -> dict:
    """compress() options from the parsed flags: the choices given (`--score shift` names the paper's
    rule, not the default reduction: repshift_fx/plan/default.py) and the other values that differ
    from Config's defaults."""
    options = {}
    for name, field in FIELDS.items():
        value = _value(name, getattr(args, name, None))
        if value is not None and (value != field.default or name in CHOICES):
            options[name] = value
    return options


def fill_defaults(args: argparse.Namespace, names) -> None:
    """Config's default for each choice in `names` not given (their flags default to None, so that
    config_options can tell a choice given from one left to the default)."""
    for name in names:
        if getattr(args, name, None) is None:
            setattr(args, name, FIELDS[name].default)


def _argument(field: dataclasses.Field) -> dict:
    """add_argument's keywords for `field`."""
    doc = field.metadata["doc"].replace("%", "%%")
    allowed, hint = FIXED.get(field.name), TYPES[field.name]
    if hint is bool:
        return {"action": "store_false" if field.default else "store_true",
                "help": f"turns {field.name} off ({field.name}: {doc})" if field.default else doc}
    if allowed is not None:
        words = "on: True, off: False; " if True in allowed else ""
        return {"choices": [_word(v) for v in allowed], "default": None,
                "help": f"{doc} ({words}default {_word(field.default)})"}
    numbers = set(members(hint)) - {type(None)}
    metavar = field.name.upper() + ("[,..]" if any(typing.get_origin(m) is tuple for m in numbers) else "")
    if len(numbers) == 1 and numbers <= {int, float}:  # a plain number: argparse reads it
        return {"type": numbers.pop(), "metavar": metavar, "help": doc}
    return {"metavar": metavar, "help": doc}


def _value(name: str, given):
    """The value of field `name` from what argparse read: None (not given), a switch's bool or a
    number as it is; a word of a choice, or the text of values, parsed."""
    if not isinstance(given, str):
        return given
    if name in FIXED:
        return next(v for v in FIXED[name] if _word(v) == given)
    kinds = set(members(TYPES[name])) - {type(None)}
    words = [w for m in kinds if typing.get_origin(m) is typing.Literal for w in typing.get_args(m)]
    if given in words:
        return given
    sequence = next((m for m in kinds if typing.get_origin(m) is tuple), None)
    if sequence is not None:  # "3,6,9", one value alone where the field also takes one
        item = typing.get_args(sequence)[0]
        values = (parse_floats if item is float else parse_ints)(given, flag(name))
        values = values if isinstance(values, tuple) else (values,)
        return values[0] if len(values) == 1 and item in kinds else values
    try:
        return int(given)
    except ValueError:
        raise SpecError(f"{flag(name)} {given!r} must be {' or '.join([*map(repr, words), 'a whole number'])}") from None


def _word(value):
    """A choice as the command spells it: True and False are on and off."""
    return {True: "on", False: "off"}[value] if isinstance(value, bool) else value
