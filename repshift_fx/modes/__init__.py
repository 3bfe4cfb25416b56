"""The reduction modes, one `Mode` each, and the choice among them.

    mode = choose(gm, ctx)     # config.mode, or with "auto" the first mode whose analysis finds sites
"""
from __future__ import annotations

import torch.fx

from repshift_fx.context import PassContext
from repshift_fx.errors import NoSiteError
from repshift_fx.modes.base import Mode
from repshift_fx.modes.lines import LINES
from repshift_fx.modes.tokens import TOKENS

MODES = {mode.name: mode for mode in (TOKENS, LINES)}

__all__ = ["Mode", "MODES", "TOKENS", "LINES", "choose"]


def choose(gm: torch.fx.GraphModule, ctx: PassContext) -> Mode:
    """Run the analysis of the mode `ctx.config.mode` names, or with "auto" of the one the graph fits:
    tokens mode when it has residual MLPs over (B, N, C) tokens, else lines mode when it has
    residual blocks over (B, C, H, W) maps. Fills `ctx.analysis` and `ctx.mode`; returns the mode.
    NoSiteError when the graph fits neither (with "auto", the message says what both found)."""
    if ctx.config.mode != "auto":
        mode = MODES[ctx.config.mode]
        mode.analyze(gm, ctx)
        return mode
    try:
        TOKENS.analyze(gm, ctx)
    except NoSiteError as tokens_error:
        try:
            LINES.analyze(gm, ctx)
        except NoSiteError as lines_error:
            message = f"{tokens_error.message} Nor for lines mode: {lines_error.message}."
            raise NoSiteError(message) from tokens_error
        return LINES
    return TOKENS
