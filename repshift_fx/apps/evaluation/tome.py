"""The ToMe baseline's r at the FLOPs of the shift's drops (a sweep over keep), or, where ToMe cannot
come down to them (a low keep), the most merges its matching allows. Texts of several lengths resolve
a FLOP target per batch instead (`calibration.measure.compress_within_reach`).

    r = tome_r(model, example, keep=0.7)         # within the shift's FLOPs at keep 0.7
    r = largest_tome_r(model, example)           # the largest r for every block that ToMe's matching allows
"""
from __future__ import annotations

from repshift_fx import inspect
from repshift_fx.errors import ConfigError
from repshift_fx.plan.tome_budget import TomeCurve


def tome_curve(model, example) -> TomeCurve:
    """ToMe's FLOP ratio on `example` against r (`repshift_fx.plan.tome_budget.TomeCurve`), counted by
    inspect(); None where r is past half of the tokens somewhere."""
    def ratio(r: int) -> float | None:
        try:
            return inspect(model, example, score="tome", r=r).flop_ratio
        except ConfigError:
            return None

    return TomeCurve(ratio)


def tome_r(model, example, keep: float, at=None) -> int | tuple[int, ...]:
    """ToMe's r at the FLOPs of the shift's drops at `keep` and `at`, the ToMe baseline at equal
    FLOPs: the planner's fewest merges within them (r + 1 in the first blocks, r after), so ToMe
    never runs on more FLOPs than the shift; the largest r where none is within."""
    if keep >= 1:
        return 0
    target = inspect(model, example, keep=keep, at=at).flop_ratio
    try:
        return inspect(model, example, score="tome", target_flops=target).budget["r"]
    except ConfigError:
        return largest_tome_r(model, example)


def largest_tome_r(model, example) -> int:
    """The largest r, the same in every block, that ToMe's matching allows on `example` (at most half
    the tokens in each block): its fewest FLOPs where the planner cannot reach a target."""
    return tome_curve(model, example).largest_r()
