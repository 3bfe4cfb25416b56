"""The default reduction: what compress(model, x) and inspect() do where the options name none.

    first, fallback = choices(options, config)  # (ToMe by Ward's cost, the paper's rule) or (config, None)

Measured on real weights (docs/results/real_vit.md, docs/results/minilm_frontier.md): ToMe's
bipartite matching ranked by Ward's cost on the stream is the most faithful reduction at every FLOP
target ToMe reaches, 31 points of agreement above the paper's drop at 0.70 of the FLOPs on the DINOv2
ViT-S/14, cosine 0.933 against 0.561 on MiniLM-L6. It reaches fewer models than the drop (43 of
the zoo's 108 at 0.70: one r per block cannot reach the target on hierarchical models, and a CNN has
no tokens to match), so the default is ToMe by Ward's cost where the planner reaches the FLOP target,
else the paper's rule (keep 0.7 after blocks d/4, d/2, 3d/4, or keep chosen for target_flops).
Any reduction option given (`score="shift"` for the paper's rule) is the user's choice, as given.
The backend has no FLOP target (it sees one graph at a time): its default is the paper's rule.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from repshift_fx.config import Config
from repshift_fx.errors import TargetOutOfReach

# the options that choose or size a reduction: any of them given, the default is not applied
REDUCTION_OPTIONS = ("keep", "at", "score", "r", "reduce", "fuse", "merge_metric", "shift_guidance", "site",
                     "distance", "residual")
RECOMMENDED = {"score": "tome", "merge_metric": "ward"}
DEFAULT_TARGET = 0.7


def names_a_reduction(options: Mapping) -> bool:
    return any(name in options for name in REDUCTION_OPTIONS)


def choices(options: Mapping, config: Config) -> tuple[Config, Config | None]:
    """(the configuration to plan first, the one to run where the planner cannot carry it out): the
    default reduction and the paper's rule where `options` name no reduction (not in lines mode),
    else (config, None)."""
    if config.mode == "lines" or names_a_reduction(options):
        return config, None
    recommended = dataclasses.replace(config, keep=None, **RECOMMENDED,
                                      target_flops=config.target_flops or DEFAULT_TARGET)
    return recommended, config


def chosen_note(config: Config) -> str:
    return (f"the default: ToMe by Ward's cost (score='tome', merge_metric='ward') at {config.target_flops:.2f} of "
            "the FLOPs, the most faithful reduction measured (docs/merge.md); score='shift' gives the paper's rule")


def fallback_note(recommended: Config, why: Exception) -> str:
    first = str(why).split("\n")[0]
    return (f"the default is the paper's rule here: ToMe by Ward's cost at {recommended.target_flops:.2f} of the "
            f"FLOPs cannot be planned for this model and input ({first})")


def named(options: Mapping) -> dict:
    """`options` with the paper's rule named (score="shift") where they name no reduction: what the
    callers that search or sweep configurations (calibrate, the evaluations) pass to compress(), so that
    an empty set of options stays the paper's rule there."""
    return dict(options) if names_a_reduction(options) else {"score": "shift", **options}


def lower_reach(first: Exception, fallback: TargetOutOfReach) -> TargetOutOfReach:
    """Of two refusals of the same FLOP target, the one that names the lower reachable ratio (the
    default reaches whichever of its reductions reaches lower)."""
    if isinstance(first, TargetOutOfReach) and first.lowest is not None and \
            (fallback.lowest is None or first.lowest < fallback.lowest):
        return first
    return fallback
