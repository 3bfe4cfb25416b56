"""Which merge's sizes go with a tensor of a merged graph.

    merged = merged_token_sets(gm)        # one per merge, in graph order
    size = sizes_for(node, merged)        # the (B, K) sizes of node's tokens, or None

A merge b leaves K tokens, each standing for `size` original ones. Its tokens are the merged
stream and everything computed from it, and the side tensors gathered with its index (a padding
mask), up to a restore. A tensor downstream of several merges (later blocks, or a two-branch
model whose streams meet) takes the latest whose K is its own token count.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx

from repshift_fx.context import Role, find_inserted, inserted, role_of
from repshift_fx.fx.nodes import reachable, shape


@dataclass(frozen=True)
class MergedTokens:
    below: set  # the nodes computed from the merge's tokens (or gathered with them), up to a restore
    kept: int  # K, the tokens it leaves
    size: torch.fx.Node  # (B, K): how many original tokens each stands for


def merged_token_sets(gm: torch.fx.GraphModule) -> list[MergedTokens]:
    found = []
    for merge in (n for n in gm.graph.nodes if role_of(n) is Role.MERGE):
        block = inserted(merge).block
        starts = [merge] + [n for n in (find_inserted(gm, Role.INDEX, block),) if n is not None]
        below = reachable(starts, lambda n: [u for u in n.users if role_of(u) is not Role.RESTORE])
        found.append(MergedTokens(below, merge.args[3], find_inserted(gm, Role.SIZE, block)))
    return found


def sizes_for(node: torch.fx.Node, merged: list[MergedTokens], axis: int = 1) -> torch.fx.Node | None:
    """The sizes of the tokens `node` holds on `axis` (its recorded shape's), or None: not a merged
    set's tokens (another branch's, every token put back, or a shape not recorded)."""
    recorded = shape(node)
    if recorded is None or not -len(recorded) <= axis < len(recorded):
        return None
    for tokens in reversed(merged):
        if node in tokens.below and recorded[axis] == tokens.kept:
            return tokens.size
    return None
