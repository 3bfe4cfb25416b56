"""Rewrite: sizes written as literals downstream of a drop follow the new token count.

Expects: a graph whose drops are inserted (`insert_pruning`) and whose nodes still carry the
shapes recorded before the drops, and `ctx.args`.
Guarantees: the graph runs on `ctx.args`; every node carries its new shape; a `view`, `reshape`
or `expand` whose literal sizes named the old token count names the new one (so does a size
node that still computes the old count, e.g. from an input size dynamo passes in). A literal the
pass cannot attribute to the token axis, or an op that fails on fewer tokens, is refused with an
`UnsupportedSiteError` that names the node and its module.

Graphs from `symbolic_trace` mostly compute sizes from `x.shape`; dynamo's graphs and
hand-written models write them as Python ints (dynamo: `reshape(s0, 197, 3, 6, 64)`, the batch a
symbol, the token count a literal).
"""
from __future__ import annotations

import math

import torch
import torch.fx

from repshift_fx.context import role_of
from repshift_fx.capture import ShapeRecorder
from repshift_fx.errors import UnsupportedSiteError, root_cause
from repshift_fx.fx.nodes import located, module_path, op_name, reachable, shape, where
from repshift_fx.wording import changed_count, why_every_token

_SIZED = ("view", "reshape", "expand")


def _size_node(node: torch.fx.Node) -> torch.fx.Node | None:
    """The `torch.Size([...])` node dynamo passes as the one size argument (HF YOLOS:
    `size_10 = torch.Size([s0, 75, 32]); reshape(size_10)`), else None."""
    rest = node.args[1:]
    if len(rest) == 1 and isinstance(rest[0], torch.fx.Node) and rest[0].target is torch.Size \
            and rest[0].args and isinstance(rest[0].args[0], (tuple, list)):
        return rest[0]
    return None


def _sizes(node: torch.fx.Node) -> tuple[list, bool]:
    """The size arguments of view/reshape/expand, and whether they were given as one tuple
    (the entries of a `torch.Size([...])` node count as given)."""
    rest = list(node.args[1:])
    holder = _size_node(node)
    if holder is not None:
        return list(holder.args[0]), True
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        return list(rest[0]), True
    return rest, False


def _set_sizes(node: torch.fx.Node, sizes: list, packed: bool, env: dict) -> None:
    """Write `sizes` back where `_sizes` read them; a `torch.Size` node (already run: its value is in
    `env`) gets the new entries, in the graph and in `env`."""
    holder = _size_node(node)
    if holder is None:
        node.args = (node.args[0], tuple(sizes)) if packed else (node.args[0], *sizes)
        return
    holder.args = (type(holder.args[0])(sizes), *holder.args[1:])
    if holder in env:  # a literal says its own value; a size node, what it said on this run
        env[holder] = torch.Size([s if isinstance(s, int) else v for s, v in zip(sizes, env[holder])])


def _value(size, env: dict, fresh: frozenset = frozenset()):
    """A size argument as a number: a literal, or the value a size node computed on this run;
    None for a size node in `fresh` (computed after a drop: it already says the new count, and
    a channel count that equals the old token count must stay as it is)."""
    if isinstance(size, torch.fx.Node):
        if size in fresh:
            return None
        value = env.get(size)
        return int(value) if isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool) else None
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def _token_position(name: str, old_in: tuple, old_out: tuple, axis: int) -> tuple[int, bool] | None:
    """Where the input's token axis `axis` lies in the output, from the shapes before the drop:
    (position, merged). `merged`: the axis is folded into the one before it, (B, N, C) -> (B * N, C).
    None where the axis is split or folded into the channels ((B, N, C) -> (B, H, W, C), (B, N * C)).

    Read from the data flow, not from the numbers in the size list: a head dim, a channel count or a
    batch size equal to the token count is not taken for it."""
    if name == "expand":  # new axes in front; the others keep their places
        j = axis + len(old_out) - len(old_in)
        return (j, False) if 0 <= j < len(old_out) and old_out[j] == old_in[axis] else None
    before, through = math.prod(old_in[:axis]), math.prod(old_in[:axis + 1])
    for j in range(len(old_out)):
        if math.prod(old_out[:j]) == before and old_out[j] == old_in[axis]:
            return j, False
        if math.prod(old_out[:j]) < before and math.prod(old_out[:j + 1]) == through:
            return j, True
    return None


def _follow_token_count(node: torch.fx.Node, old_in: tuple, new_in: tuple, env: dict | None = None,
                        fresh: frozenset = frozenset()) -> None:
    """Rewrite the sizes of one view/reshape/expand whose input lost tokens.

    The size that stands for the token axis is the one at the place the input's token axis takes in
    the output (`_token_position`, from the recorded shapes). There a literal, or a size node computed
    from tensors the drop does not reach (dynamo's graphs compute sizes from symbolic input sizes it
    pinned; a stale `N = x.shape[1]` taken before the drop), still says the old count on this example
    and is replaced by the new one; -1 and sizes computed from the pruned tensors already fit. Where
    the output shape does not place the axis, a size equal to the old count is taken for it if it
    is the only one."""
    env = real_env = env if env is not None else {}
    changed = [i for i, (a, b) in enumerate(zip(old_in, new_in)) if a != b]
    if len(changed) != 1:
        return
    old_n, new_n = old_in[changed[0]], new_in[changed[0]]
    sizes, packed = _sizes(node)
    holder = _size_node(node)
    if holder is not None and holder in env:  # its entries' own values may be freed already
        env = {**env, **{s: v for s, v in zip(sizes, env[holder]) if isinstance(s, torch.fx.Node)}}
    actual = [_value(s, env) for s in sizes]
    if op_name(node) != "expand" and None not in actual and -1 not in actual and math.prod(actual) == math.prod(new_in):
        return  # the sizes already fit the pruned input (a literal channel count may equal the old token count)
    values = [_value(s, env, fresh) for s in sizes]
    old_out = shape(node)
    found = _token_position(op_name(node), old_in, old_out, changed[0]) if old_out and len(old_out) == len(sizes) \
        else None
    if found is not None:
        j, merged = found
        if values[j] == old_out[j]:  # a literal or stale size; -1 and fresh sizes stay
            sizes[j] = old_out[j] // old_n * new_n if merged else new_n
    else:
        hits = [i for i, v in enumerate(values) if v == old_n]
        if len(hits) > 1:
            raise UnsupportedSiteError(
                f"{where(node)} writes the token count {old_n} as a literal more than once {tuple(sizes)}, and its "
                f"output {tuple(old_out or ())} does not show where the token axis went; cannot tell which is the "
                "token axis. Write the sizes from x.shape, or prune after it.", **located(node)
            )
        if hits:
            sizes[hits[0]] = new_n
    known = [s for s in sizes if isinstance(s, int) and s != -1]
    numel = math.prod(new_in)
    if op_name(node) != "expand" and -1 not in sizes and all(isinstance(s, int) for s in sizes) and math.prod(known) != numel:
        raise needs_every_token(f"{where(node)} {why_every_token(node, old_n, new_n)}, and {new_n} reach it once "
                                "tokens are dropped", node)
    _set_sizes(node, sizes, packed, real_env)


def needs_every_token(what: str, node: torch.fx.Node) -> UnsupportedSiteError:
    """The refusal of a node that needs every token; the planner says where and what to do
    (repshift_fx/wording.py: need_message)."""
    err = UnsupportedSiteError(f"{what}; restore='auto' (the default) or restore=True puts every token back before "
                               "it, or drop only after it (at=...).", node=node.name, module=module_path(node),
                               needs_every_token=True)
    err.what = what
    return err


def _after_drops(gm: torch.fx.GraphModule) -> frozenset:
    """Every node downstream of a drop's index (by any edge, sizes included)."""
    indices = [n for n in gm.graph.nodes if role_of(n) == "index"]
    return frozenset(reachable(indices, lambda n: n.users))


class FollowingShapeProp(ShapeRecorder):
    """Shape recording that adjusts literal sizes just before a node runs on fewer tokens."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm)
        self.old_shapes = {n: shape(n) for n in gm.graph.nodes}  # overwritten as nodes run
        self.fresh = _after_drops(gm)

    def run_node(self, n: torch.fx.Node):
        if op_name(n) in _SIZED and n.args and isinstance(n.args[0], torch.fx.Node):
            old_in = self.old_shapes.get(n.args[0])
            new_in = self.env.get(n.args[0])
            if old_in is not None and isinstance(new_in, torch.Tensor) and tuple(new_in.shape) != old_in:
                _follow_token_count(n, old_in, tuple(new_in.shape), self.env, self.fresh)
        try:
            return super().run_node(n)
        except UnsupportedSiteError:
            raise
        except Exception as wrapped:
            counts = changed_count(n, self.old_shapes, self.env)
            what = (f"{where(n, self.module)} fails on fewer tokens ({type(root_cause(wrapped)).__name__})"
                    if counts is None else
                    f"{where(n, self.module)} {why_every_token(n, *counts, gm=self.module)}, and {counts[1]} "
                    "reach it once tokens are dropped")
            raise needs_every_token(what, n) from wrapped


def run(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    FollowingShapeProp(gm).propagate(*ctx.args)
    gm.recompile()
    return gm
