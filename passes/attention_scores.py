"""Rewrite: the attention of every scoring block yields the EViT importance (score="attention").

Expects: `ctx.plan` and `ctx.analysis` (the blocks, their nodes), `ctx.tokens.attention` (the records
`attention_to_sdpa` left), shapes recorded on the nodes. Runs after `attention_to_sdpa` and before
`insert_pruning`; does nothing unless `ctx.config.score == "attention"`.
Guarantees: for each drop, the scoring block's one attention is computed explicitly and a node
`repshift_score_i` of shape (B, N) holds each token's importance,

    CLS token (prefix >= 1):  mean over heads of softmax(q k^T s)[:, :, 0, :]   (the CLS row)
    no prefix tokens:         mean over heads and queries of softmax(q k^T s)    (attention received)

(`repshift_fx.method.tokens.attention_importance`); `ctx.tokens.importance` maps the block index to that node's
name. The forms, and what each becomes:

    F.scaled_dot_product_attention(q, k, v, ...)    -> attention.explicit_attention(q, k, v, ..., prefix=p)
    nn.MultiheadAttention (a leaf) / its functional -> the same call with need_weights=True,
                                                       average_attn_weights=True (no fast path)
    explicit softmax kept (sdpa=False)              -> importance read from the softmax output

Every other block's attention (SDPA, fused) is left as it is. The block's attention records in
`ctx.tokens.attention` say "explicit (attention score)", and a note names the blocks. A scoring block with
no attention, several, a dropout rate computed in the graph, or attention whose key axis is not the block's
token axis (heads folded into the batch, windows) is refused with an `UnsupportedSiteError`.
"""
from __future__ import annotations

import inspect
import operator

import torch
import torch.fx

from repshift_fx.context import mark
from repshift_fx.method import attention
from repshift_fx.errors import UnsupportedSiteError
from repshift_fx.fx.nodes import literal_arg, located, nodes_by_name, op_name, reachable, shape, where

IMPL = "explicit (attention score)"
_FORMS = ("scaled_dot_product_attention", "multihead_attention", "softmax")


def _attention_node(gm, block) -> torch.fx.Node:
    """The one attention node (SDPA, MultiheadAttention or softmax) on the block's token-mixing branch."""
    mixer = block.mixer
    if mixer is None or mixer.kind != "attention":
        raise UnsupportedSiteError(
            f"score='attention' needs an attention sub-layer in block {block.index} ({block.module or 'root'}), "
            f"which has {'none' if mixer is None else 'a token-mixing branch of kind ' + repr(mixer.kind)}; "
            "use score='shift'",
            module=block.module)
    by_name = nodes_by_name(gm)
    # every edge, not only those with recorded shapes: attention_to_sdpa's SDPA nodes carry none yet
    members = (reachable([by_name[mixer.stream]], lambda n: n.users)
               & reachable([by_name[mixer.branch]], lambda n: n.all_input_nodes))
    found = [n for n in members if op_name(n, gm) in _FORMS]
    if len(found) != 1:
        names = ", ".join(sorted(n.name for n in found)) or "none"
        raise UnsupportedSiteError(
            f"score='attention' reads one attention map per scoring block, but block {block.index} "
            f"({block.module or 'root'}) has {len(found)} ({names}); use score='shift'", module=block.module
        )
    return found[0]


def _check_tokens(node: torch.fx.Node, probs_shape: tuple, batch: int, tokens: int) -> None:
    """The weights must be (B, [H,] N, N) over the block's tokens, batch first."""
    if len(probs_shape) < 3 or probs_shape[0] != batch or probs_shape[-1] != tokens or probs_shape[-2] != tokens:
        raise UnsupportedSiteError(
            f"{where(node)}: its attention weights would be {tuple(probs_shape)}, not (batch {batch}, heads, "
            f"{tokens}, {tokens}) over the block's tokens (heads folded into the batch, windows or "
            "cross-attention); score='attention' cannot tell each token's importance. Use score='shift'.", **located(node)
        )


def _sdpa_args(node: torch.fx.Node) -> inspect.BoundArguments:
    bound = inspect.signature(attention.explicit_attention).bind(*node.args, **node.kwargs)
    dropout = bound.arguments.get("dropout_p", 0.0)
    if isinstance(dropout, torch.fx.Node):
        raise UnsupportedSiteError(f"{where(node)} applies a dropout rate computed in the graph to the attention "
                                   "weights; give the model a fixed attention dropout rate", **located(node))
    return bound


def _explicit_sdpa(gm, node: torch.fx.Node, prefix: int, batch: int, tokens: int, name: str) -> torch.fx.Node:
    """SDPA -> explicit_attention(..., prefix) -> (output, importance); returns the importance node."""
    q, k = shape(node.args[0]), shape(literal_arg(node, 1, "key"))
    if q is None or k is None:
        raise UnsupportedSiteError(f"{where(node)}: the shapes of its query and key are unknown", **located(node))
    _check_tokens(node, (*q[:-1], k[-2]), batch, tokens)
    bound = _sdpa_args(node)
    graph = gm.graph
    with graph.inserting_before(node):
        explicit = graph.call_function(attention.explicit_attention, bound.args, {**bound.kwargs, "prefix": prefix})
        output = graph.call_function(operator.getitem, (explicit, 0))
        score = graph.create_node("call_function", operator.getitem, (explicit, 1), name=name)
    for new in (explicit, output, score):
        new.meta.update({k: v for k, v in node.meta.items() if k not in ("tensor_meta", "val", "example_value")})
    output.meta.update({k: v for k, v in node.meta.items() if k in ("tensor_meta", "val", "example_value")})
    node.replace_all_uses_with(output)
    graph.erase_node(node)
    return score


def _weighted_mha(gm, node: torch.fx.Node, prefix: int, batch: int, tokens: int, name: str) -> torch.fx.Node:
    """nn.MultiheadAttention (module or functional): ask for head-averaged weights (B, L, S)."""
    target = gm.get_submodule(node.target).forward if node.op == "call_module" else node.target
    bound = inspect.signature(target).bind(*node.args, **node.kwargs)
    bound.arguments.update(need_weights=True, average_attn_weights=True)
    node.args, node.kwargs = bound.args, bound.kwargs
    query, key = shape(bound.arguments["query"]), shape(bound.arguments["key"])
    if query is None or key is None:
        raise UnsupportedSiteError(f"{where(node)}: the shapes of its query and key are unknown", **located(node))
    batch_first = getattr(gm.get_submodule(node.target), "batch_first", False) if node.op == "call_module" else False
    length, source = (query[1], key[1]) if batch_first else (query[0], key[0])
    _check_tokens(node, (batch, length, source), batch, tokens)
    graph = gm.graph
    with graph.inserting_after(node):
        weights = graph.call_function(operator.getitem, (node, 1))
    with graph.inserting_after(weights):
        score = graph.create_node("call_function", attention.attention_importance, (weights, prefix), name=name)
    for new in (weights, score):
        new.meta.update({k: v for k, v in node.meta.items() if k == "nn_module_stack"})
    return score


def _tapped_softmax(gm, node: torch.fx.Node, prefix: int, batch: int, tokens: int, name: str) -> torch.fx.Node:
    """An explicit softmax left by attention_to_sdpa: read the importance from its output."""
    _check_tokens(node, shape(node) or (), batch, tokens)
    with gm.graph.inserting_after(node):
        score = gm.graph.create_node("call_function", attention.attention_importance, (node, prefix), name=name)
    score.meta.update({k: v for k, v in node.meta.items() if k == "nn_module_stack"})
    return score


_REWRITES = {"scaled_dot_product_attention": _explicit_sdpa, "multihead_attention": _weighted_mha,
             "softmax": _tapped_softmax}


def _label_records(ctx, block) -> None:
    members = set().union(*(site.nodes for site in (block.mlp, block.mixer) if site is not None))
    for record in ctx.tokens.attention:
        if record.node in members:
            record.impl, record.reason = IMPL, ""


def run(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    ctx.tokens.importance = {}
    if ctx.config.score != "attention" or not ctx.plan.drops:
        return gm
    for drop in ctx.plan.drops:
        block = ctx.analysis.blocks[drop.block]
        node = _attention_node(gm, block)
        stream = shape(nodes_by_name(gm)[block.input])
        score = _REWRITES[op_name(node, gm)](gm, node, drop.prefix, stream[0], block.tokens,
                                             f"repshift_score_{drop.block}")
        mark(score, "score", drop.block)
        ctx.tokens.importance[drop.block] = score.name
        _label_records(ctx, block)
    blocks = ", ".join(str(d.block + ctx.block_offset) for d in ctx.plan.drops)
    what = "the CLS token's attention" if ctx.plan.prefix else "the attention each token receives (no CLS token)"
    ctx.notes.append(f"score='attention': block(s) {blocks} compute attention explicitly (softmax(q k^T) v) to "
                     f"read {what}; every other attention stays as it was (fused)")
    gm.graph.lint()
    gm.recompile()
    return gm
