"""Rewrite: whatever carries the token axis downstream of a drop is gathered with the drop's indices.

Expects: `insert_pruning` has run (each drop's index and kept tokens, roles "index" and "keep"), the nodes
still carry the shapes recorded before the drops, `ctx.plan`, `ctx.analysis` and `ctx.args`.
Guarantees: the graph runs on `ctx.args` with every tensor that meets the pruned tokens cut to the
same tokens, in the same order:

- a side tensor (rotary table, attention mask, relative-position bias, a position table) that meets
  the pruned stream in a broadcasting op (`x * rope`, `scores + bias`, SDPA's `attn_mask`) is
  gathered on the axes that line up with the stream's token axes, with the index of every drop it
  has not been through. An axis of N entries takes the index as it is; one of N - p entries (no
  row for the p prefix tokens: EVA02's rope) takes `index[:, p:] - p`. A side tensor without a
  batch axis gains one (each sample keeps its own tokens): (N-1, D) -> (B, 1, K, D) against
  (B, H, K, D) queries, (1, H, N, N) -> (B, H, K, K).
- a side computation that runs after a drop on a batch-first tensor of the inputs (the padding
  mask of mean pooling, `mask.sum(1)`) reads the gathered tensor, so it counts the kept tokens only;
- (padded positions score lowest at every drop: passes/padding_scores.py, before this pass).
Nodes past a restore (passes/restore_tokens.py) see every token again and are left alone.

A side tensor whose token axis cannot be attributed (a size that is neither N nor N - p, tokens
not batch-first, heads folded into the batch) or that meets a fused token (`fuse=True`) is refused
with an `UnsupportedSiteError` naming the node and module. `ctx.tokens.side_gathers` lists what was gathered.
"""
from __future__ import annotations

import torch
import torch.fx

from repshift_fx.context import inserted, mark, role_of
from repshift_fx.errors import UnsupportedSiteError
from repshift_fx.fx.nodes import (literal_arg, located, nodes_by_name, op_name, reachable, regions, tensor_args,
                                  value_phrase, where)
from repshift_fx.passes.token_shapes import FollowingShapeProp

# attention calls whose mask (argument 3 or attn_mask) is cut to the kept tokens: SDPA, and the
# explicit form score="attention" puts in the scoring blocks (same arguments)
_ATTENTION = {"scaled_dot_product_attention", "explicit_attention"}
# ops that join a tensor to the pruned tokens along another axis: a full-length one is refused
_JOINS = {"cat", "stack", "concat", "concatenate"}
# ops whose tensor arguments broadcast against each other, element by element
_BROADCAST = {"add", "sub", "mul", "truediv", "div", "where", "masked_fill", "maximum", "minimum", "lerp",
              "addcmul", "addcdiv", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "and_", "or_"}


def gather_side(side: torch.Tensor, index: torch.Tensor, axes: tuple[int, ...], rank: int, offset: int = 0):
    """`side` cut to the kept tokens on `axes`, per sample.

    side: any shape whose last axes line up (broadcast) with a `rank`-axis batch-first tensor;
    index: (B, K') kept positions (prefix first); offset p: the side tensor has no rows for the p
    prefix tokens, so the kept non-prefix positions `index[:, p:] - p` are taken.
    Returns a (B, ...) tensor of `rank` axes with K' - p entries on each of `axes`."""
    if offset:
        index = index[:, offset:] - offset
    while side.dim() < rank:
        side = side.unsqueeze(0)
    side = side.expand(index.shape[0], *side.shape[1:])
    for axis in axes:
        view = [1] * rank
        view[0], view[axis] = index.shape[0], index.shape[1]
        sizes = list(side.shape)
        sizes[axis] = index.shape[1]
        side = side.gather(axis, index.reshape(view).expand(sizes))
    return side


class _Drops:
    """The drops of the plan as graph nodes, and which drop each node lies downstream of."""

    def __init__(self, gm: torch.fx.GraphModule, plan):
        by_name = nodes_by_name(gm)
        self.drops = [d for d in plan.drops if not d.mlp_only]  # an MLP-only drop's MLPs take no side tensor
        roles = {(role_of(n), inserted(n).block): n for n in gm.graph.nodes if role_of(n) in ("index", "keep")}
        self.index = [roles["index", d.block] for d in self.drops]
        self.keep = [roles["keep", d.block] for d in self.drops]
        self.after = [by_name[d.after] for d in self.drops]
        self.region = regions(self.keep, stop=lambda node: role_of(node) == "restore")
        # the drops, up to k, that the tokens entering drop k went through with no restore since: not
        # those of another branch (CrossViT's two streams) nor those undone before drop k
        unrestored = lambda node: [u for u in node.users if role_of(u) != "restore"]  # noqa: E731
        downstream = [reachable([keep], unrestored) for keep in self.keep]  # one walk per drop
        self.through = [[j for j in range(k) if self.after[k] in downstream[j]] + [k] for k in range(len(self.drops))]

    def tokens(self, k: int) -> int:
        """Tokens entering drop k, prefix included."""
        return self.drops[k].prefix + self.drops[k].before

    def level(self, size: int, k: int) -> tuple[int, int] | None:
        """(first drop to go through, offset) for a side axis of `size` entries met after drop k:
        the latest drop j of k's lineage entered by `size` tokens (offset 0) or `size` + p (offset p)."""
        for j in reversed(self.through[k]):
            prefix = self.drops[j].prefix
            if size == self.tokens(j):
                return j, 0
            if prefix and size == self.tokens(j) - prefix:
                return j, prefix
        return None


class _SideGatherer(FollowingShapeProp):
    """Shape following (token_shapes) that also gathers the side tensors each node reads."""

    def __init__(self, gm: torch.fx.GraphModule, drops: _Drops, from_inputs: set, blocks=()):
        super().__init__(gm)
        self.blocks = blocks  # the analysis's, to name a side tensor that is a block's input or output
        self.drops, self.from_inputs = drops, from_inputs  # from_inputs: the nodes downstream of a user input
        for keep, after in zip(drops.keep, drops.after):
            self.old_shapes[keep] = self.old_shapes.get(after)
        for index in drops.index:  # the gathers read the indices long after their last use
            for dying in self.user_to_last_uses.values():
                if index in dying:
                    dying.remove(index)
        self.cache: dict[tuple, torch.fx.Node] = {}
        self.current = -1  # the last drop whose keep node has run
        self.gathered: list[str] = []

    def run_node(self, n: torch.fx.Node):
        if n in self.drops.keep:
            self.current = self.drops.keep.index(n)
        elif inserted(n) is None and n.op.startswith("call"):
            k = self.drops.region.get(n)
            if k is not None:
                self._frontier(n, k)
            elif self.current >= 0:
                self._late_side(n, self.current)
                if op_name(n) in _BROADCAST:
                    self._align_operands(n, self.current)
        return super().run_node(n)

    # --- where a side tensor meets the pruned stream ---

    def _frontier(self, n: torch.fx.Node, k: int) -> None:
        op = op_name(n)
        if op in _ATTENTION:
            mask = literal_arg(n, 3, "attn_mask")
            sides = [mask] if isinstance(mask, torch.fx.Node) and self.drops.region.get(mask) != k else []
            q, key = n.args[0], literal_arg(n, 1, "key")
            new = self._pair(self._new(q), self._new(key))
            old = self._pair(self.old_shapes.get(q), self.old_shapes.get(key))
        elif op in _JOINS:
            self._refuse_joined(n, k)
            return
        elif op in _BROADCAST:
            inner = [a for a in tensor_args(n) if self.drops.region.get(a) == k or a is self.drops.keep[k]]
            sides = [a for a in tensor_args(n) if a not in inner]
            new = _broadcast([self._new(a) for a in inner])
            old = _broadcast([self.old_shapes.get(a) for a in inner])
        else:
            return
        if not sides or new is None or old is None or len(new) != len(old):
            return
        axes = [i for i in range(len(new)) if new[i] != old[i]]
        for side in sides:
            value = self.env.get(side)
            if isinstance(value, torch.Tensor):
                self._gather_aligned(n, side, value, new, axes, k)

    def _gather_aligned(self, n, side, value, new: tuple, token_axes: list[int], k: int) -> None:
        rank = len(new)
        if value.dim() > rank:
            return
        padded = (1,) * (rank - value.dim()) + tuple(value.shape)
        axes = tuple(i for i in token_axes if padded[i] not in (1, new[i]))
        if not axes:
            return
        if 0 in axes or padded[0] not in (1, new[0]) or new[0] != self._batch():
            raise UnsupportedSiteError(
                f"{where(n)} reads {self._value(side)} {tuple(value.shape)} with tokens {tuple(new)} that are not "
                "batch-first (heads folded into the batch?): the pass cannot tell which entries to keep. "
                "Prune after this block (a later `at`), or choose another model.", **located(n)
            )
        self._replace(n, side, self._chain(n, side, value, axes, rank, padded, k))

    def _late_side(self, n: torch.fx.Node, k: int) -> None:
        """A side computation after drop k on a batch-first input tensor (mean pooling's mask)."""
        for side in tensor_args(n):
            value = self.env.get(side)
            if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[0] != self._batch():
                continue
            if side in self.drops.region or side not in self.from_inputs:
                continue
            if not self._feeds_region(n, k):
                return
            sizes = tuple(value.shape)
            axes = tuple(i for i in range(1, len(sizes)) if self.drops.level(sizes[i], k) is not None)
            if axes:
                self._replace(n, side, self._chain(n, side, value, axes, len(sizes), sizes, k))

    def _align_operands(self, n: torch.fx.Node, k: int) -> None:
        """A broadcasting op after drop k between side tensors, one already cut to the kept tokens and
        one not (T5: `where(mask, position_bias, min)`, the (B, 1, K, K) mask cut as an input-side
        tensor, the (1, H, N, N) bias built from the sizes alone): the uncut one is gathered too."""
        operands = [(a, self.env.get(a)) for a in n.all_input_nodes]
        operands = [(a, v) for a, v in operands if isinstance(v, torch.Tensor) and a not in self.drops.region]
        rank = max((v.dim() for _, v in operands), default=0)
        padded = {a: (1,) * (rank - v.dim()) + tuple(v.shape) for a, v in operands}
        for side, value in operands:
            if inserted(side) is not None:  # cut already
                continue
            axes = tuple(i for i in range(1, rank) if self.drops.level(padded[side][i], k) is not None
                         and any(p[i] not in (1, padded[side][i]) for p in padded.values()))
            if axes:
                self._replace(n, side, self._chain(n, side, value, axes, rank, padded[side], k))

    def _refuse_joined(self, n: torch.fx.Node, k: int) -> None:
        """A tensor computed over every token before drop k, joined to the kept tokens (cat/stack
        along the channels): it still holds the dropped tokens' entries. Refused, not gathered:
        whether the model means it per token cannot be read from a join."""
        parts = n.args[0] if n.args and isinstance(n.args[0], (list, tuple)) else ()
        inner = [p for p in parts if isinstance(p, torch.fx.Node) and (self.drops.region.get(p) == k
                                                                       or p is self.drops.keep[k])]
        if not inner:
            return
        old, new = self.old_shapes.get(inner[0]), self._new(inner[0])
        axes = [i for i in range(len(new or ())) if old and len(old) == len(new) and old[i] != new[i]]
        for part in parts:
            value = self.env.get(part) if isinstance(part, torch.fx.Node) else None
            if part in inner or not isinstance(value, torch.Tensor) or value.dim() != len(new or ()):
                continue
            if any(value.shape[i] == old[i] for i in axes):
                drop = self.drops.drops[k]
                raise UnsupportedSiteError(
                    f"{where(n)} joins {self._value(part)} {tuple(value.shape)}, computed over all {old[axes[0]]} tokens "
                    f"before the drop after block {drop.block}, to the {new[axes[0]]} tokens kept: it still holds "
                    "the dropped tokens. Compute it inside the block from the tokens it receives, or drop only "
                    f"after the last block that reads it (a later `at`).", **located(n))

    def _value(self, node: torch.fx.Node) -> str:
        """A side tensor in the model's terms (a refusal names no node of the captured graph)."""
        return value_phrase(node, self.module, self.blocks)

    # --- building the gathers ---

    def _chain(self, n, side, value, axes, rank, sizes, k) -> torch.fx.Node:
        levels = {self.drops.level(sizes[i], k) for i in axes}
        if None in levels or len(levels) != 1:
            raise UnsupportedSiteError(
                f"{where(n)} reads {self._value(side)} {tuple(value.shape)}, whose axes {axes} meet the pruned tokens "
                f"but hold {[sizes[i] for i in axes]} entries, not the {self.drops.tokens(k)} tokens entering the "
                f"drop after block {self.drops.drops[k].block} (nor those less the prefix): the pass cannot "
                "tell which entries to keep. Prune after this block (a later `at`), or choose another model.", **located(n)
            )
        first, offset = levels.pop()
        node = side
        for j in (j for j in self.drops.through[k] if j >= first):
            if self.drops.drops[j].fused:
                raise UnsupportedSiteError(
                    f"{where(n)} reads {self._value(side)}, a tensor that carries the token axis, after a drop with "
                    "fuse=True: the fused token has no entry in it. Use fuse=False with this model.", **located(n)
                )
            node = self._gather_node(node, j, axes, rank, offset, n)
        return node

    def _gather_node(self, source: torch.fx.Node, j: int, axes, rank: int, offset: int, before) -> torch.fx.Node:
        key = (source, j, axes, rank, offset)
        if key not in self.cache:
            graph, index = self.module.graph, self.drops.index[j]
            with graph.inserting_before(before):
                node = graph.create_node("call_function", gather_side, (source, index, axes, rank, offset),
                                         name=f"repshift_side_{self.drops.drops[j].block}")
            root = getattr(inserted(source), "source", None) or source.name  # a gather's or restore's input
            mark(node, "side", self.drops.drops[j].block, source=root)
            value = gather_side(self.env[source], self.env[index], axes, rank, offset)
            self.env[node] = value
            self.old_shapes[node] = tuple(value.shape)
            self.cache[key] = node
            self.gathered.append(f"{source.name} -> {node.name} {tuple(value.shape)} (axes {list(axes)})")
        return self.cache[key]

    def _replace(self, n: torch.fx.Node, side: torch.fx.Node, gathered: torch.fx.Node) -> None:
        n.replace_input_with(side, gathered)

    # --- helpers ---

    def _new(self, node):
        value = self.env.get(node)
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None

    @staticmethod
    def _pair(q, key):
        if q is None or key is None:
            return None
        return tuple(q[:-1]) + (key[-2],)

    def _batch(self) -> int:
        return self.old_shapes[self.drops.after[0]][0]

    def _feeds_region(self, n: torch.fx.Node, k: int) -> bool:
        seen, todo = set(), [n]
        while todo:
            for user in todo.pop().users:
                if self.drops.region.get(user) == k:
                    return True
                if user not in seen:
                    seen.add(user)
                    todo.append(user)
        return False


def _broadcast(shapes: list) -> tuple | None:
    shapes = [s for s in shapes if s is not None]
    if not shapes:
        return None
    try:
        return tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        return None


# reads of a tensor's shape, not of its values: what follows them does not carry the batch axis
_SHAPE_READS = {"size", "sym_size", "sym_size_int", "dim", "numel", "sym_numel"}


def _value_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The users that read `node`'s values: a tensor built from an input's shape alone (HF BEiT's
    (heads, N, N) position bias, sized by the image) holds no sample axis, whatever its first size."""
    return [u for u in node.users if op_name(u).split(".")[0] not in _SHAPE_READS
            and not (op_name(u) == "getattr" and len(u.args) > 1 and u.args[1] in ("shape", "dtype", "device"))]


def run(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    ctx.tokens.side_gathers = []
    if not ctx.plan.drops:
        return gm
    drops = _Drops(gm, ctx.plan)
    weights = ctx.weight_placeholders
    user_inputs = [n for n in gm.graph.nodes if n.op == "placeholder" and n.name not in weights]
    gatherer = _SideGatherer(gm, drops, reachable(user_inputs, _value_users), getattr(ctx.analysis, "blocks", ()))
    gatherer.propagate(*ctx.args)
    ctx.tokens.side_gathers = gatherer.gathered
    gm.graph.lint()
    gm.recompile()
    return gm
