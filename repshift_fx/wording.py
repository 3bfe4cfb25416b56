"""Refusals in the model's terms: what needs every token, where in the model, and what to do.

    why_every_token(node, old_n, new_n)     -> "reshapes its 196 tokens into a 14 x 14 grid"
    place(analysis, module, upstream)       -> ("block 5 (layers.1.blocks.0)", 5)
    need_message(what, where, first_ok, tried)  -> the refusal's message, for the user

A node that fails on fewer tokens is described by what it does with them (a reshape to a grid, a
token-mixing weight, a table sized for every token), located by the block that holds it, and
answered with what can work: restore before it, a drop after it, or lines mode. No graph node is
named: the user knows modules and blocks, not the names of a traced graph.
"""
from __future__ import annotations

import math

import torch.fx

from repshift_fx.fx.nodes import module_phrase, op_name, shape, within_module

_RESHAPES = {"view", "reshape", "unflatten", "view_as", "reshape_as", "permute", "transpose", "flatten"}
_GRID_OPS = {"layer_norm", "conv1d", "conv2d", "conv3d", "batch_norm", "max_pool2d", "avg_pool2d", "unfold",
             "pad", "roll", "interpolate", "pixel_shuffle", "adaptive_avg_pool2d", "group_norm"}
_MIXING = {"linear", "matmul", "mm", "bmm", "addmm", "einsum", "baddbmm"}
_TABLES = {"add", "sub", "mul", "div", "where", "masked_fill", "iadd", "imul"}


def _grid(dims, tokens: int) -> str | None:
    """'14 x 14' where two or three consecutive sizes multiply to the token count."""
    dims = [d for d in dims if isinstance(d, int)]
    for width in (2, 3):
        for i in range(len(dims) - width + 1):
            part = dims[i:i + width]
            if min(part) > 1 and math.prod(part) == tokens:
                return " x ".join(map(str, part))
    return None


def why_every_token(node: torch.fx.Node, old_n: int, new_n: int, gm=None) -> str:
    """What `node` does that needs all `old_n` tokens, in the model's terms."""
    op = op_name(node, gm)
    if op in _RESHAPES:
        grid = _grid(shape(node) or (), old_n)
        return (f"reshapes its {old_n} tokens into a {grid} grid" if grid else
                f"reshapes its {old_n} tokens to {tuple(shape(node) or ())}")
    if op in _GRID_OPS:
        return f"works on the tokens laid out as a grid of all {old_n} (a reshape before it keeps the grid's size)"
    if op in _MIXING:
        return f"mixes the tokens with weights sized for {old_n} of them (a token-mixing layer)"
    if op in _TABLES:
        return f"combines them with a tensor sized for all {old_n} tokens (a position bias, a mask or a table)"
    if op in ("assert", "_assert"):
        return f"checks that all {old_n} tokens are there"
    if op in ("cat", "stack"):
        return f"joins them with a tensor sized for all {old_n} tokens"
    return f"needs all {old_n} tokens"


def changed_count(node: torch.fx.Node, old_shapes: dict, env: dict) -> tuple[int, int] | None:
    """(tokens before, tokens after) on the first input of `node` whose shape the drops changed."""
    for arg in node.all_input_nodes:
        old, new = old_shapes.get(arg), env.get(arg)
        new = tuple(new.shape) if hasattr(new, "shape") else None
        if old and new and len(old) == len(new) and old != new:
            axis = next(i for i, (a, b) in enumerate(zip(old, new)) if a != b)
            return old[axis], new[axis]
    return None


def place(analysis, module: str | None, upstream: set[str]) -> tuple[str, int | None]:
    """('block 5 (layers.1.blocks.0)', 5): the block that holds the module, or where outside the
    blocks it lies; and the first block a drop after which would run past it (None: none)."""
    blocks = getattr(analysis, "blocks", [])
    for block in blocks:
        if within_module(module, block.module):
            return f"block {block.index} ({block.module})", block.index
    before = [b for b in blocks if b.output in upstream]
    name = module_phrase(module)
    if not before:
        return f"{name}, before the first block", 0
    last = before[-1]
    after = last.index + 1 if last.index + 1 < len(blocks) else None
    return f"{name}, after block {last.index} ({last.module or '-'})", after


def _advice(first_ok: int | None, tried_restore: bool) -> str:
    later = (f"drop only after it, at blocks {first_ok} and later (at=...)" if first_ok is not None else
             "no block after it can drop")
    lines = "or prune rows and columns instead (mode='lines')"
    if not tried_restore:
        return f"restore='auto' (the default) or restore=True puts every token back before it; or {later}"
    return (f"Putting the tokens back before it cannot help, since the drop is undone right there (or inside the "
            f"block that needs them); {later} if those blocks keep the tokens as tokens, {lines}")


def need_message(what: str, where: str, first_ok: int | None, tried_restore: bool, hint: str = "") -> str:
    """A refusal of a node that needs every token, said as the user sees the model: where, why, what
    to do (`hint`: one more thing to try, a sentence)."""
    return f"{where}: {what}. {_advice(first_ok, tried_restore)}." + (f" {hint}" if hint else "")
