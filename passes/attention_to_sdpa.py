"""Rewrite: explicit attention softmax(q k^T * s + mask) v -> F.scaled_dot_product_attention.

Expects: a GraphModule with shapes. In training mode (`compress(train=True)`) a dropout on the
attention weights becomes SDPA's `dropout_p`; in eval mode it is the identity.
Guarantees: every softmax that is provably attention becomes one SDPA node with the same value
(scale and additive mask carried over); every other softmax is left as it is. `ctx.tokens.attention`
gets one `AttentionRecord` per attention found, rewritten or not, with the reason when not.

Accepted forms, in any call style (`@`, `torch.matmul`, `torch.bmm`, `x.softmax`, `F.softmax`):

    scores = q @ k.transpose(-2, -1)     (or k.mT; the scale may be applied to q first)
    scores = scores * s | scores / s     (optional)
    scores = scores + mask               (optional, a float mask added after scaling)
    probs  = softmax(scores, dim=-1)     (a dtype= equal to the scores' dtype too)
    probs  = dropout(probs)              (optional; SDPA's dropout_p in training, identity in eval)
    probs  = probs.to(dtype)             (optional, when it keeps the dtype: HF's `.to(query.dtype)`)
    out    = probs @ v

Each intermediate must be used only by the next step: if anything else reads the scores or the
attention weights (an attention map that is returned or stored), the softmax is kept.

Causal attention after a drop is refused (`UnsupportedSiteError` naming the node and module):
SDPA with `is_causal=True`, or a mask (SDPA's `attn_mask`, or the tensor added to the scores
before a softmax) that, evaluated on the example input, lets each token see only the tokens
before it. Dropping a token there changes what the later tokens may see (decoders are out of scope).
"""
from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F

from repshift_fx.errors import UnsupportedSiteError
from repshift_fx.fx.nodes import carries_tensor, literal_arg, located, module_path, op_name, reachable, shape, where

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
        users = ", ".join(op_name(u) for u in node.users)
        raise _Keep(f"the {what} is also read by {users or 'nothing'}")
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
    raise _Keep("the key operand is not a transpose of the last two axes")


def _match(softmax: torch.fx.Node, gm) -> dict:
    rank = len(shape(softmax) or ())
    dim = literal_arg(softmax, 1, "dim")
    if dim is None or dim % max(rank, 1) != rank - 1:
        raise _Keep("the softmax is not over the last axis")
    if literal_arg(softmax, 2, "dtype") not in (None, softmax.args[0].meta["tensor_meta"].dtype):
        raise _Keep("the softmax changes dtype")
    chain = [softmax]
    user = _only_user(softmax, "attention weights")
    while op_name(user, gm) in _PASS_THROUGH or _keeps_dtype(user, gm):
        chain.append(user)
        user = _only_user(user, "attention weights")
    if op_name(user, gm) not in _PRODUCT or user.args[0] is not chain[-1]:
        raise _Keep(f"the attention weights go to {op_name(user, gm)}, not to a product with values")
    found = {"out": user, "v": user.args[1], "chain": chain, "mask": None, "scale": None,
             "dropout_p": _dropout_rate([n for n in chain if op_name(n, gm) == "dropout"], gm)}

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
            raise _Keep(f"{op_name(scores)} between the scores and the softmax is not understood")
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


def _dropout_rate(dropouts: list[torch.fx.Node], gm) -> float:
    """The rate at which the dropouts on the attention weights drop them: a module's p in training
    mode, F.dropout's p when its `training` is True; 0 in eval."""
    rates = []
    for node in dropouts:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            rates.append(module.p if module.training else 0.0)
            continue
        p, training = literal_arg(node, 1, "p", 0.5), literal_arg(node, 2, "training", True)
        if not isinstance(p, numbers.Number) or not isinstance(training, bool):
            raise _Keep("the dropout on the attention weights has a rate or mode computed in the graph")
        rates.append(float(p) if training else 0.0)
    active = [r for r in rates if r]
    if len(active) > 1:
        raise _Keep("two dropouts act on the attention weights")
    return active[0] if active else 0.0


def _keeps_dtype(node: torch.fx.Node, gm) -> bool:
    """A `.to(...)` / `.type_as(...)` whose output has its input's dtype, device and shape: a no-op."""
    if op_name(node, gm) not in ("to", "type_as", "type") or not isinstance(node.args[0], torch.fx.Node):
        return False
    before, after = node.args[0].meta.get("tensor_meta"), node.meta.get("tensor_meta")
    return (before is not None and after is not None and before.dtype == after.dtype
            and tuple(before.shape) == tuple(after.shape))


def _split_mask(add: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node]:
    a, b = (add.args + (None,))[:2]
    for scores, mask in ((a, b), (b, a)):
        if isinstance(scores, torch.fx.Node) and (op_name(scores) in _PRODUCT or _constant(scores)):
            if isinstance(mask, torch.fx.Node):
                return scores, mask
    raise _Keep("the add before the softmax is not a mask added to the scores")


def _rewrite(gm: torch.fx.GraphModule, found: dict) -> None:
    graph, out = gm.graph, found["out"]
    with graph.inserting_before(out):
        kwargs = {"attn_mask": found["mask"], "dropout_p": found["dropout_p"], "scale": _scale_arg(graph, found["scale"])}
        sdpa = graph.call_function(F.scaled_dot_product_attention, (found["q"], found["k"], found["v"]), kwargs)
    sdpa.meta.update({k: v for k, v in out.meta.items() if k != "tensor_meta"})
    out.replace_all_uses_with(sdpa)
    position = {node: i for i, node in enumerate(graph.nodes)}
    for node in sorted([out] + found["chain"], key=position.get, reverse=True):
        if not node.users:
            graph.erase_node(node)


def _mask_of(node: torch.fx.Node, gm) -> torch.fx.Node | None:
    """The mask an attention applies: SDPA's attn_mask, or the tensor added to the scores of a softmax."""
    if op_name(node, gm) == "scaled_dot_product_attention":
        mask = literal_arg(node, 3, "attn_mask")
        return mask if isinstance(mask, torch.fx.Node) else None
    scores = node.args[0] if node.args else None
    if isinstance(scores, torch.fx.Node) and op_name(scores) == "add":
        try:
            return _split_mask(scores)[1]
        except _Keep:
            return None
    return None


def is_causal_mask(mask: torch.Tensor) -> bool:
    """True when a (..., N, N) boolean or additive mask hides every later token from each query while
    some query sees an earlier token other than the first (a padding-only mask never does both)."""
    if mask.dim() < 2 or mask.shape[-1] != mask.shape[-2] or mask.shape[-1] < 3:
        return False
    seen = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    n = mask.shape[-1]
    later = torch.ones(n, n, dtype=torch.bool, device=mask.device).triu(1)
    earlier = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril(-1)
    earlier[:, 0] = False
    return not bool(seen[..., later].any()) and bool(seen[..., earlier].any())


def _evaluate(gm: torch.fx.GraphModule, args: tuple, wanted: list[torch.fx.Node]) -> dict:
    """The values of `wanted` on `args`, running only the nodes they depend on."""
    needed = reachable(wanted, lambda n: n.all_input_nodes)
    runner = torch.fx.Interpreter(gm)
    runner.args_iter = iter(gm.graph.process_inputs(*args))
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.op == "placeholder" or node in needed:
                runner.env[node] = runner.run_node(node)
    return {node: runner.env[node] for node in wanted}


def refuse_causal(gm: torch.fx.GraphModule, ctx) -> None:
    """Raise if an attention of a block after the first drop is causal (see the module docstring)."""
    plan, analysis = getattr(ctx, "plan", None), getattr(ctx, "analysis", None)
    if plan is None or analysis is None or not plan.drops:
        return
    first = plan.drops[0].block
    later = {name: block for block in analysis.blocks[first + 1:] if block.mixer is not None
             for name in block.mixer.nodes}
    found = [n for n in gm.graph.nodes if n.name in later
             and op_name(n, gm) in ("scaled_dot_product_attention", "softmax")]
    masks = {n: _mask_of(n, gm) for n in found}
    values = _evaluate(gm, ctx.args, [m for m in masks.values() if m is not None]) if any(masks.values()) else {}
    for node, mask in masks.items():
        flag = literal_arg(node, 5, "is_causal", False) is True if op_name(node, gm) != "softmax" else False
        if flag or (mask is not None and isinstance(values.get(mask), torch.Tensor) and is_causal_mask(values[mask])):
            how = "is_causal=True" if flag else "its attention mask lets each token see only the tokens before it"
            block = later[node.name]
            raise UnsupportedSiteError(
                f"{where(node, gm)} is causal "
                f"attention ({how}) in block {block.index}, after the drop after block {first}: dropping a token "
                "there changes what the later tokens may see, so causal decoders are not pruned. Use an "
                "encoder (bidirectional attention), or drop only after the last causal block.", **located(node)
            )


def run(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    refuse_causal(gm, ctx)
    records = []
    for node in list(gm.graph.nodes):
        op = op_name(node, gm)
        path = module_path(node)
        if op in ("scaled_dot_product_attention", "multihead_attention"):
            records.append(AttentionRecord(node.name, path, "sdpa" if op.startswith("scaled") else op))
        elif op == "softmax" and node.op != "call_module":
            if not ctx.config.sdpa:
                records.append(AttentionRecord(node.name, path, "explicit", "sdpa=False"))
                continue
            try:
                found = _match(node, gm)
            except _Keep as why:
                records.append(AttentionRecord(node.name, path, "explicit", str(why)))
                continue
            _rewrite(gm, found)
            records.append(AttentionRecord(node.name, path, "explicit -> sdpa"))
    ctx.tokens.attention = records
    gm.graph.lint()
    gm.recompile()
    return gm
