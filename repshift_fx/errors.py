"""Every error repshift_fx raises on bad input is a `RepShiftError`, one subclass per cause."""


class RepShiftError(Exception):
    """Base class: the message says what was wrong and what to do."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # torch.fx's Interpreter appends its node dump to args; not shown
        return self.message


class ConfigError(RepShiftError, ValueError):
    """A compress()/inspect() argument is out of range or malformed (keep, at, site, ...)."""


class ModelModeError(RepShiftError):
    """The model is in training mode; the pass compresses inference graphs only."""


class TraceError(RepShiftError):
    """torch.fx could not trace the model; the message names the module and the reason."""


class ExampleInputError(RepShiftError):
    """The example input does not fit the model (wrong rank, size or type)."""


class NoSiteError(RepShiftError):
    """No residual MLP (token-local branch) was found on the residual stream."""


class UnsupportedSiteError(RepShiftError):
    """A requested site cannot be pruned safely; the message names the node and the module."""


def root_cause(err: BaseException) -> BaseException:
    """The innermost cause: torch.fx's ShapeProp wraps the model's own error in a RuntimeError."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err
