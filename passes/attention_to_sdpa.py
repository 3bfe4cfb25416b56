"""Rewrite: explicit attention softmax(q k^T * s + mask) v -> F.scaled_dot_product_attention.

Expects: a GraphModule with shapes, traced in eval mode (dropout is the identity).
Guarantees: every softmax that is provably attention becomes one SDPA node with the same value
(scale and additive mask carried over); every other softmax is left as it is. `ctx.attention`
gets one `AttentionRecord` per attention found, rewritten or not, with the reason when not.

Accepted forms, in any call style (`@`, `torch.matmul`, `torch.bmm`, `x.softmax`, `F.softmax`):

    scores = q @ k.transpose(-2, -1)     (or k.mT; the scale may be applied to q first)
    scores = scores * s | scores / s     (optional)
    scores = scores + mask               (optional, a float mask added after scaling)
    probs  = softmax(scores, dim=-1)
    probs  = dropout(probs)              (optional; identity in eval)
    out    = probs @ v

Each intermediate must be used only by the next step: if anything else reads the scores or the
attention weights (an attention map that is returned or stored), the softmax is kept.
"""
from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F

from repshift_fx.graph import carries_tensor, literal_arg, module_path, op_name, shape

_PRODUCT = ("matmul", "bmm")
_PASS_THROUGH = ("dropout", "identity")


@dataclass
class AttentionRecord:
    node: str  # the SDPA / MultiheadAttention / softmax node as found
    module: str
    impl: str  # "sdpa" | "multihead_attention" | "explicit -> sdpa" | "explicit"
    reason: str = ""


class _Keep(Exception):
    """This softmax stays explicit; the message says why."""


def _only_user(node: torch.fx.Node, what: str) -> torch.fx.Node:
    if len(node.users) != 1:
        users = ", ".join(u.name for u in node.users)
        raise _Keep(f"the {what} '{node.name}' is also read by {users or 'nothing'}")
    return next(iter(node.users))


def _is_number(arg) -> bool:
    """A Python number, or a node computing one from sizes (e.g. head_dim ** -0.5)."""
    if isinstance(arg, torch.fx.Node):
        return not carries_tensor(arg) and arg.op != "placeholder"
    return isinstance(arg, numbers.Real) and not isinstance(arg, bool)


def _constant(node: torch.fx.Node) -> tuple[torch.fx.Node, tuple] | None:
    """(tensor, (c, inverse)) for `tensor * c`, `c * tensor` or `tensor / c` with a number c."""
    op = op_name(node)
    a, b = (node.args + (None, None))[:2]
    if node.kwargs or not (isinstance(a, torch.fx.Node) or isinstance(b, torch.fx.Node)):
        return None
    if op == "mul":
        if _is_number(b) and carries_tensor(a):
            return a, (b, False)
        if _is_number(a) and carries_tensor(b):
            return b, (a, False)
    if op in ("truediv", "div") and _is_number(b) and carries_tensor(a):
        return a, (b, True)
    return None


def _scale_arg(graph: torch.fx.Graph, scale) -> float | torch.fx.Node:
    if scale is None:
        return 1.0
    factor, inverse = scale
    if isinstance(factor, torch.fx.Node):
        return graph.call_function(operator.truediv, (1.0, factor)) if inverse else factor
    return 1.0 / float(factor) if inverse else float(factor)


def _untransposed(kt: torch.fx.Node) -> torch.fx.Node:
    """k for k.transpose(-2, -1), k.transpose(2, 3) on 4-D, k.mT, or a permute swapping the last two."""
    rank = len(shape(kt) or ())
    last_two = {rank - 2, rank - 1}
    op = op_name(kt)
    if op == "transpose":
        dims = {d % rank for d in kt.args[1:3]} if len(kt.args) >= 3 else set()
        if dims == last_two:
            return kt.args[0]
    if op == "getattr" and kt.args[1] == "mT":
        return kt.args[0]
    if op == "permute":
        dims = kt.args[1] if len(kt.args) == 2 and isinstance(kt.args[1], (tuple, list)) else kt.args[1:]
        expected = list(range(rank - 2)) + [rank - 1, rank - 2]
        if [d % rank for d in dims] == expected:
            return kt.args[0]
    raise _Keep(f"the key operand '{kt.name}' is not a transpose of the last two axes")


def _match(softmax: torch.fx.Node, gm) -> dict:
    rank = len(shape(softmax) or ())
    dim = literal_arg(softmax, 1, "dim")
    if dim is None or dim % max(rank, 1) != rank - 1:
        raise _Keep("the softmax is not over the last axis")
    if literal_arg(softmax, 2, "dtype") not in (None, softmax.args[0].meta["tensor_meta"].dtype):
        raise _Keep("the softmax changes dtype")
    chain = [softmax]
    user = _only_user(softmax, "attention weights")
    while op_name(user, gm) in _PASS_THROUGH:
        chain.append(user)
        user = _only_user(user, "attention weights")
    if op_name(user, gm) not in _PRODUCT or user.args[0] is not chain[-1]:
        raise _Keep(f"the attention weights go to {op_name(user, gm)} '{user.name}', not to a product with values")
    found = {"out": user, "v": user.args[1], "chain": chain, "mask": None, "scale": None}

    scores = softmax.args[0]
    while op_name(scores) not in _PRODUCT:
        _only_user(scores, "scores")
        chain.append(scores)
        scaled = _constant(scores)
        if scaled is not None and found["scale"] is None:
            scores, found["scale"] = scaled
        elif op_name(scores) == "add" and found["mask"] is None and found["scale"] is None:
            scores, found["mask"] = _split_mask(scores)
        else:
            raise _Keep(f"{op_name(scores)} '{scores.name}' between the scores and the softmax is not understood")
    _only_user(scores, "scores")
    chain.append(scores)
    q, kt = scores.args[:2]
    found["k"] = _untransposed(kt)
    if found["scale"] is None and len(q.users) == 1 and _constant(q) is not None:
        chain.append(q)
        q, found["scale"] = _constant(q)
    found["q"] = q
    found["chain"] = chain + [kt]
    return found


def _split_mask(add: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node]:
    a, b = (add.args + (None,))[:2]
    for scores, mask in ((a, b), (b, a)):
        if isinstance(scores, torch.fx.Node) and (op_name(scores) in _PRODUCT or _constant(scores)):
            if isinstance(mask, torch.fx.Node):
                return scores, mask
    raise _Keep(f"the add '{add.name}' before the softmax is not a mask added to the scores")


def _rewrite(gm: torch.fx.GraphModule, found: dict) -> None:
    graph, out = gm.graph, found["out"]
    with graph.inserting_before(out):
        kwargs = {"attn_mask": found["mask"], "dropout_p": 0.0, "scale": _scale_arg(graph, found["scale"])}
        sdpa = graph.call_function(F.scaled_dot_product_attention, (found["q"], found["k"], found["v"]), kwargs)
    sdpa.meta.update({k: v for k, v in out.meta.items() if k != "tensor_meta"})
    out.replace_all_uses_with(sdpa)
    position = {node: i for i, node in enumerate(graph.nodes)}
    for node in sorted([out] + found["chain"], key=position.get, reverse=True):
        if not node.users:
            graph.erase_node(node)


def run(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    records = []
    for node in list(gm.graph.nodes):
        op = op_name(node, gm)
        where = module_path(node)
        if op in ("scaled_dot_product_attention", "multihead_attention"):
            records.append(AttentionRecord(node.name, where, "sdpa" if op.startswith("scaled") else op))
        elif op == "softmax" and node.op != "call_module":
            if not ctx.config.sdpa:
                records.append(AttentionRecord(node.name, where, "explicit", "sdpa=False"))
                continue
            try:
                found = _match(node, gm)
            except _Keep as why:
                records.append(AttentionRecord(node.name, where, "explicit", str(why)))
                continue
            _rewrite(gm, found)
            records.append(AttentionRecord(node.name, where, "explicit -> sdpa"))
    ctx.attention = records
    gm.graph.lint()
    gm.recompile()
    return gm
