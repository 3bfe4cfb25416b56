"""Every error repshift_fx raises on bad input is a `RepShiftError`, one subclass per cause."""
import re


class RepShiftError(Exception):
    """Base class: the message says what was wrong and what to do."""

    def __init__(self, message: str, *, node: str | None = None, module: str | None = None, plan=None,
                 needs_every_token: bool = False):
        super().__init__(message)
        self.message = message
        self.node = node  # the model's node it concerns, where one is known
        self.module = module  # that node's module path, as the user's model names it
        self.plan = plan  # the plan fixed before the refusal (the FLOP-budget search learns from it)
        self.needs_every_token = needs_every_token  # restore=True would put every token back before it
        self.analysis = None  # the analysis of the graph it arose in, set by the planner or the mode

    def __str__(self) -> str:  # torch.fx's Interpreter appends its node dump to args; not shown
        return self.message


class ConfigError(RepShiftError, ValueError):
    """A compress()/inspect() argument is out of range or malformed (keep, at, site, ...)."""


class TargetOutOfReach(ConfigError):
    """target_flops is below what any schedule reaches on this input (a short text, a small image).
    `lowest`: the lowest FLOP ratio reachable; `deepest`: the compress() options of the schedule that
    reaches it (the amount, keep or ToMe's r, and at), for callers that run inputs of many lengths."""

    def __init__(self, message: str, *, lowest: float | None = None, deepest: dict | None = None):
        super().__init__(message)  # copy and pickle rebuild it from the message, then its __dict__
        self.lowest, self.deepest = lowest, deepest


class ModelModeError(RepShiftError):
    """The model is in training mode; the pass compresses inference graphs only."""


class TraceError(RepShiftError):
    """torch.fx could not trace the model; the message names the module and the reason."""


class CaptureError(RepShiftError):
    """The captured graph does not compute what the model computes on the example input; the
    message names the first module whose output differs."""


class ExampleInputError(RepShiftError):
    """The example input does not fit the model (wrong rank, size or type)."""


class NoSiteError(RepShiftError):
    """No residual MLP (token-local branch) was found on the residual stream."""


class UnsupportedSiteError(RepShiftError):
    """A requested site cannot be pruned safely; the message names the node and the module."""


class ExportError(RepShiftError):
    """The compressed graph could not be written as ONNX (an op torch.export or ONNX cannot take,
    an unwritable path, the export extra missing); the message names the node and module."""


_PROXY = re.compile(r"Proxy\((\w+)\)")


def described(err: BaseException, values: dict | None = None) -> str:
    """'AssertionError: height (12) must be divisible by window (8)': the model's own message, where
    a message formatted while torch.fx traced holds `Proxy(getitem_30)` for a value the graph
    computes, that value on the example input (`values`: by node name) where it is a number, else
    'a traced size': a message names no node of the captured graph. Its first line only: torch.fx's
    Interpreter appends the node it ran ("While executing %getitem_3 ...")."""
    def value(match) -> str:
        found = (values or {}).get(match.group(1))
        found = found.item() if getattr(found, "numel", lambda: 0)() == 1 else found
        return str(found) if isinstance(found, (int, float)) else "a traced size"

    first = next((line for line in str(err).splitlines() if line.strip()), "")  # not torch.fx's node dump
    return f"{type(err).__name__}: {_PROXY.sub(value, first)}"


def root_cause(err: BaseException) -> BaseException:
    """The innermost cause: torch.fx's ShapeProp wraps the model's own error in a RuntimeError."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err
