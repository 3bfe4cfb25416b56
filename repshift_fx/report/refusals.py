"""The report of a refused model: `inspect()` still shows the blocks, with the refusal marked.

    report = refused_report(model, example_input, config, error)

`compress()` raises the `UnsupportedSiteError` the passes raise (Swin's windows, a reshape back to
a grid, a dense head, causal attention, a side tensor the pass cannot attribute); `inspect()`
returns this report instead: every block as the analysis found it, no token dropped, the block
that holds the refused node marked with the reason, and the error's message under "refused".
"""
from __future__ import annotations

import dataclasses

from repshift_fx.capture import capture
from repshift_fx.config import Config
from repshift_fx.context import PassContext
from repshift_fx.errors import UnsupportedSiteError
from repshift_fx.modes.tokens import TOKENS
from repshift_fx.passes import attention_to_sdpa
from repshift_fx.plan.tokens import PrunePlan, default_at
from repshift_fx.report.tokens import Report, build_report

def _block_of(analysis, node: str | None, module: str | None):
    """The block whose nodes hold `node` or whose module holds `module`; None when outside every block."""
    for block in analysis.blocks:
        sites = [s for s in (block.mixer, block.mlp) if s is not None]
        if node is not None and any(node in s.nodes for s in sites):
            return block
        if module and block.module and (module == block.module or module.startswith(block.module + ".")):
            return block
    return None


def refused_report(model, example_input, config: Config, error: UnsupportedSiteError) -> Report:
    """The analysis of `model` with nothing pruned, and `error` marked where it arose.

    Re-raises `error` when the model has no token blocks to show (the refusal came earlier)."""
    gm, args = capture(model, example_input)
    unpruned = dataclasses.replace(config, keep=None if config.score == "tome" else 1.0, target_flops=None)
    ctx = PassContext(config=unpruned, args=args, model_name=type(model).__name__)
    try:
        TOKENS.analyze(gm, ctx)  # the tokens mode's analysis, as the run loop runs it
    except Exception:
        raise error from None
    analysis = ctx.analysis
    prefix = analysis.prefix if config.protect == "auto" else int(config.protect)
    ctx.plan = PrunePlan(ctx.config, [], [b.tokens for b in analysis.blocks], prefix)
    attention_to_sdpa.run(gm, ctx)
    report = build_report(ctx, gm=gm)
    node, module = error.node, error.module
    block = _block_of(analysis, node, module)
    where = f"block {block.index} ({block.module or 'root'})" if block is not None else "outside the blocks"
    if block is not None:
        report.blocks[block.index].refused = error.message
    said = error.message if getattr(error, "what", None) else f"{where} (module '{module or '-'}'): {error.message}"
    report.refused.insert(0, said)  # a refusal in model terms says where already
    report.config["at"] = config.at if config.at is not None else default_at(len(analysis.blocks))
    report.config["keep"] = config.keep
    report.notes.append("nothing is pruned: compress() refuses this model with this config (see 'refused')")
    return report
