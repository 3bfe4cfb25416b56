"""Verify: the rewritten graph gives outputs of the original shapes.

Expects: `token_shapes` has run (every node carries its new shape) and `ctx.output_shapes`
holds the output shapes recorded at capture. Guarantees: the graph is unchanged; a mismatch is
an `UnsupportedSiteError` naming the output.
"""
from __future__ import annotations

import torch.fx

from repshift_fx.errors import UnsupportedSiteError
from repshift_fx.fx.nodes import in_module, module_path, shape


def output_shapes(gm: torch.fx.GraphModule) -> list:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    found = []
    torch.fx.map_arg(out.args, lambda a: found.append((a.name, shape(a))))
    return found


def run(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    for (name, old), (_, new) in zip(ctx.output_shapes, output_shapes(gm)):
        if old != new:
            node = next((n for n in gm.graph.nodes if n.name == name), None)
            where = f"of {in_module(node)}" if node is not None else "of the model"
            raise UnsupportedSiteError(
                f"output {where} changes shape from {old} to {new} once tokens are dropped "
                "(a dense-prediction head needs every token, and so does a model that returns every "
                "token, such as BertModel's last_hidden_state). restore=True (or 'auto', the default) puts "
                "every token back before it; or prune with a classification head, or pool inside the model.",
                node=name, module=module_path(node) if node is not None else None, needs_every_token=True,
            )
    return gm
