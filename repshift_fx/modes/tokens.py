"""Tokens mode: (B, N, C) token streams (ViTs, text encoders, video transformers)."""
from __future__ import annotations

import logging

from repshift_fx.config import Config
from repshift_fx.errors import ConfigError
from repshift_fx.modes.base import Mode
from repshift_fx.passes import (attention_scores, attention_to_sdpa, find_sites, find_token_needs, gather_side_tensors,
                                insert_pruning, merge_tokens, mlp_only_drops, padding_scores, proportional_attention,
                                restore_tokens, size_weighted_pooling, token_shapes, verify)
from repshift_fx.plan.budget import plan_tokens_for_budget
from repshift_fx.plan.tome_budget import TomeSearch
from repshift_fx.plan.restores import plan_tokens
from repshift_fx.plan.tokens import site_of
from repshift_fx.report.tokens import token_report

log = logging.getLogger("repshift_fx")


def check_token_keep(config: Config) -> None:
    keep = config.keep
    if isinstance(keep, tuple) and any(isinstance(k, tuple) for k in keep):
        raise ConfigError(f"keep={keep!r} holds (rows, cols) pairs, which are for line-wise pruning of CNNs; "
                          "this model is pruned by tokens: give one rate per entry of at, or a single float")


def search_budget(model, example_input, config: Config, unpruned, rewrite):
    """`target_flops` -> the keep rate (plan/budget.py), or with score="tome" ToMe's r (plan/tome_budget.py)."""
    if config.score == "tome":
        return TomeSearch(model, example_input, config, unpruned, rewrite).plan()
    return plan_tokens_for_budget(model, example_input, config, unpruned, rewrite)


def log_token_plan(ctx) -> None:
    plan, analysis = ctx.plan, ctx.analysis
    for drop in plan.drops:
        log.info(
            "%s: block %d (%s) scores by %s; keeps %d + %d of %d tokens",
            ctx.model_name, drop.block + ctx.block_offset, analysis.blocks[drop.block].module or "-",
            plan.config.score if plan.config.score != "shift" else
            f"shift({site_of(analysis.blocks[drop.block], plan.config)}, {plan.config.distance})",
            drop.prefix, drop.keep, drop.prefix + drop.before,
        )
    rewritten = sum(rec.impl == "explicit -> sdpa" for rec in ctx.tokens.attention)
    if rewritten:
        log.info("%s: %d explicit attentions rewritten to SDPA", ctx.model_name, rewritten)


TOKENS = Mode(
    name="tokens",
    analysis_passes=(find_sites, find_token_needs),
    make_plan=plan_tokens,
    rewrite_passes=(attention_to_sdpa, attention_scores, insert_pruning, mlp_only_drops, padding_scores, merge_tokens, restore_tokens,
                    gather_side_tensors, proportional_attention, size_weighted_pooling, token_shapes, verify),
    report=token_report,
    search_budget=search_budget,
    log_plan=log_token_plan,
    check_config=check_token_keep,
)
