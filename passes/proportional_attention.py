"""Rewrite (reduce="merge", score="tome"): attention after a merge weighs each key by its size,
softmax(q k^T * scale + log size) v (ToMe's proportional attention), with attention kept fused.

Expects: `merge_tokens` has run (each merge's tokens and size, roles "keep" and "size"), the side
tensors gathered.
Guarantees: every `F.scaled_dot_product_attention` call downstream of a merge (and not past a
restore) reads `with_size_bias(attn_mask, size, q)` as its attn_mask, the sizes of its keys' own
merged tokens (`repshift_fx.fx.sizes`: the latest merge upstream of the keys that left as many
tokens as they hold; none, for another branch's keys: noted in the report); CPU and GPU fused
kernels take a float mask. With `size_attention="qk"` an SDPA call
without a mask becomes `proportional_attention` instead: the size rides in an extra column of q
and k, so kernels that take no mask (FlashAttention on GPU) stay usable. Attention inside
nn.MultiheadAttention or kept explicit is left as it is, with a note in the report.
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F

from repshift_fx.context import inserted, mark
from repshift_fx.fx.nodes import literal_arg, op_name
from repshift_fx.fx.sizes import merged_token_sets, sizes_for
from repshift_fx.method import merge


def _bias_mask(graph, node, size) -> None:
    query = node.args[0]
    mask = literal_arg(node, 3, "attn_mask")
    with graph.inserting_before(node):
        biased = graph.call_function(merge.with_size_bias, (mask, size, query))
    mark(biased, "bias", inserted(size).block)
    args, kwargs = list(node.args), dict(node.kwargs)
    if len(args) > 3:
        args[3] = biased
    else:
        kwargs["attn_mask"] = biased
    node.args, node.kwargs = tuple(args), kwargs


def _without_mask(graph, node, size) -> None:
    query, key, value = node.args[:3]
    with graph.inserting_before(node):
        new = graph.call_function(merge.proportional_attention,
                                  (query, key, value, size, literal_arg(node, 6, "scale")))
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def run(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    token_sets = merged_token_sets(gm)
    if not token_sets:
        return gm
    graph, config = gm.graph, ctx.plan.config
    downstream = set().union(*(tokens.below for tokens in token_sets))
    mha = other = 0
    for node in list(graph.nodes):
        if node not in downstream:
            continue
        if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
            size = sizes_for(node.args[1], token_sets, axis=-2)  # the keys' (B, H, K, D)
            if size is None:  # its keys are another branch's tokens, or every token put back
                other += 1
                continue
            plain = literal_arg(node, 3, "attn_mask") is None and not literal_arg(node, 5, "is_causal", False)
            if config.size_attention == "qk" and plain:
                _without_mask(graph, node, size)
            else:
                _bias_mask(graph, node, size)
        elif op_name(node, gm) == "multihead_attention":
            mha += 1
    if mha:
        ctx.notes.append(f"{mha} MultiheadAttention call(s) after a merge attend without the token sizes")
    if other:
        ctx.notes.append(f"{other} attention call(s) after a merge attend over keys that are not merged tokens "
                         "(another branch's, or every token put back); they attend without sizes")
    gm.graph.lint()
    gm.recompile()
    return gm
