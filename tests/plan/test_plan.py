"""The FLOP-budget planner: its cost model is exact, its choice is the best single rate."""
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import assume, given, strategies as st

import repshift_fx
from conftest import tiny_timm
from repshift_fx import ConfigError
from repshift_fx.config import Config
from repshift_fx.flops import count_macs
from repshift_fx.pipeline import plan_for_budget, rewrite, rewrite_unpruned
from repshift_fx.plan.budget import CostModel, TokenSearch, kept_chain, largest_rate, step_ends, walk_to_largest
from repshift_fx.plan.tome_budget import TomeCurve, first_within
from repshift_fx.plan.tokens import kept_count

X = torch.randn(1, 3, 64, 64)


@pytest.fixture(scope="module")
def model():
    return tiny_timm("deit_tiny_patch16_224", depth=4)


def candidate_rates(before: int) -> list[float]:
    """Every rate at which some drop's kept count steps (j/m, m <= before): the brute-force oracle."""
    return sorted({j / m for m in range(1, before + 1) for j in range(1, m + 1)})


def test_candidate_rates_cover_every_step_of_every_drop():
    rates = candidate_rates(6)
    assert rates[0] == 1 / 6 and rates[-1] == 1.0
    # between two neighbouring candidates no kept count of any size <= 6 changes
    for low, high in zip(rates, rates[1:]):
        middle = (low + high) / 2
        assert all(kept_count(middle, n) == kept_count(high, n) for n in range(1, 7))


def _search(model, config):
    return TokenSearch(model, X, config, rewrite_unpruned(model, X, config), rewrite)


def test_kept_chain_counts_as_the_plan_does(model):
    gm = repshift_fx.compress(model, X, keep=0.55, at=(0, 1, 2), compile=False)
    assert kept_chain(0.55, 16, 3) == (9, 5, 3)
    assert gm.report.tokens == [17, 10, 6, 4]


@pytest.mark.parametrize("before,drops", [(16, 2), (196, 3), (4095, 3)])
def test_largest_rate_matches_brute_force_and_snaps(before, drops):
    def cost(rate):  # a schedule's "FLOPs": tokens summed over the drops, squared terms too
        return sum(k + k * k // 7 for k in kept_chain(rate, before, drops))

    rates = candidate_rates(before) if before < 1000 else None
    for fraction in (0.05, 0.31, 0.5, 0.65, 0.999):
        limit = Fraction(fraction) * cost(1.0)
        rate = largest_rate(cost, limit, before)
        assert cost(rate) <= limit
        if rates is not None:
            assert cost(rate) == max(cost(r) for r in rates if cost(r) <= limit)
            assert rate in rates  # snapped to the end of its step, j/m
        assert cost(min(1.0, rate + 1e-9)) > limit or rate == 1.0
    assert largest_rate(cost, Fraction(0), before) is None
    assert largest_rate(cost, Fraction(cost(1.0)), before) == 1.0


def test_cost_model_interpolates_exactly():
    # 3 n^2 + 5 n + 7, known at three points, evaluated elsewhere
    model = CostModel(fixed=100, points=[{n: 3 * n * n + 5 * n + 7 for n in (2, 9, 17)}])
    assert model.macs((11,)) == 100 + 3 * 121 + 55 + 7


def test_cost_model_predicts_the_counted_flops_of_every_schedule(model):
    measure = _search(model, Config(target_flops=0.5, at=(0, 2)))
    cost = measure.cost_model()
    for rate in (1 / 16, 0.3, 0.5, 0.77, 1.0):
        tokens = tuple(measure.prefix + k for k in kept_chain(rate, measure.before, 2))
        assert cost.macs(tokens) == measure.total(rate), rate
    assert measure.total(1.0) == count_macs(model, (X,))  # the scoring nodes add no counted FLOPs


@pytest.fixture(scope="module")
def every_schedule(model):
    """Counted MACs of every distinct single-rate schedule at at=(0, 2), by brute force."""
    measure = _search(model, Config(target_flops=0.5, at=(0, 2)))
    by_chain = {}
    for rate in candidate_rates(measure.before):
        by_chain.setdefault(kept_chain(rate, measure.before, 2), rate)
    return measure.original, [measure.total(rate) for rate in by_chain.values()]


@pytest.mark.parametrize("target", [0.5, 0.72, 0.9])
def test_budget_choice_is_the_best_single_rate(model, every_schedule, target):
    config, result = plan_for_budget(model, X, Config(target_flops=target, at=(0, 2)))
    original, totals = every_schedule
    best = max(t for t in totals if t <= target * original)
    assert result.reached <= target
    assert round(result.gflops_after * 1e9) == best
    assert config.keep == result.keep and config.at == (0, 2) and config.target_flops is None


def test_compress_with_target_flops_reports_the_budget(model):
    gm = repshift_fx.compress(model, X, score="shift", target_flops=0.8, compile=False)
    budget = gm.report.budget
    assert budget["target"] == 0.8 and budget["reached"] <= 0.8
    assert gm.report.config["target_flops"] == 0.8 and gm.report.config["keep"] == budget["keep"]
    assert [row.tokens_out - 1 for row in gm.report.blocks if row.scored] == list(budget["kept"])
    with torch.no_grad():
        assert gm(X).shape == model(X).shape


def test_inspect_target_matches_the_flop_count(model):
    report = repshift_fx.inspect(model, X, target_flops=0.7, at=(1,))
    assert report.flop_ratio == pytest.approx(report.budget["reached"], abs=1e-12)
    assert 0.6 < report.flop_ratio <= 0.7


@pytest.mark.parametrize("options,match", [
    ({"target_flops": 0.5, "keep": 0.5}, "give one"),
    ({"target_flops": 1.5}, r"\(0, 1\]"),
    ({"target_flops": 0.0}, r"\(0, 1\]"),
    ({"target_flops": "0.5"}, r"\(0, 1\]"),
    ({"target_flops": 0.05, "at": (2,)}, "below what any schedule"),
])
def test_bad_targets(model, options, match):
    with pytest.raises(ConfigError, match=match):
        repshift_fx.compress(model, X, compile=False, **options)


def test_keep_default_unchanged_without_target():
    assert Config().keep == 0.7 and Config(keep=0.5).target_flops is None


def _linear_nearest(cost, target):
    """The scan the ToMe baseline of the harness made before `TomeCurve`: from r=0 up."""
    best, r = None, 0
    while (ratio := cost(r)) is not None:
        if best is None or abs(ratio - target) < best[0]:
            best = (abs(ratio - target), r)
        if ratio < target:
            break
        r += 1
    return best[1]


def _linear_within(cost, target):
    """The scan of the per-batch ToMe baseline before `TomeCurve`: the smallest r >= 1 within, else the largest."""
    r = 0
    while cost(r + 1) is not None:
        if cost(r + 1) <= target:
            return r + 1
        r += 1
    return r


@pytest.mark.parametrize("tokens", [1, 2, 3, 7, 16, 50])
def test_tome_curve_finds_what_a_linear_scan_finds(tokens):
    def cost(r):  # falling in r; refused past half of the tokens
        return None if 2 * r > tokens else 1.0 - r * (r + 3) / (tokens * (tokens + 3))

    for refused in (None, tokens + 1):
        for target in [i / 40 for i in range(41)] + [cost(r) for r in range(tokens // 2 + 1)]:
            curve = TomeCurve(cost, refused)
            assert curve.largest_r() == tokens // 2
            assert curve.nearest_r(target) == _linear_nearest(cost, target)
            if target < 1.0:  # r=0 is within only at target 1, where the old scan never started
                within = curve.smallest_r_within(target)
                assert (curve.largest_r() if within is None else within) == _linear_within(cost, target)
                assert within is None or cost(within) <= target < cost(within - 1)


@given(st.lists(st.integers(1, 1000), min_size=1, max_size=80), st.integers(0, 100_000), st.booleans())
def test_first_within_finds_the_first_step_within_in_about_bisections_probes(drops, limit, costed_low):
    """Any falling cost (plateaus too): the answer of a linear scan, in at most twice bisection's probes."""
    costs = [100_000 - sum(drops[:x]) for x in range(len(drops) + 1)]  # falls as x grows
    assume(costs[0] > limit >= costs[-1])
    probed = []

    def cost(x):
        probed.append(x)
        return costs[x]

    low = 0 if costed_low else -1
    found = first_within(low, len(costs) - 1, cost, limit)
    assert found == next(x for x, c in enumerate(costs) if c <= limit)
    assert len(set(probed) - {low, len(costs) - 1}) <= 2 * math.ceil(math.log2(len(costs) - low)) + 1


@pytest.mark.parametrize("before", [1, 6, 16])
def test_step_ends_are_the_neighbouring_candidate_rates(before):
    rates = candidate_rates(before)
    for i, rate in enumerate(rates):
        below, above = step_ends(rate, before)
        assert below == (rates[i - 1] if i else None) and above == (rates[i + 1] if i + 1 < len(rates) else None)
        if i + 1 < len(rates):  # a rate inside a step: the ends around it
            assert step_ends((rate + rates[i + 1]) / 2, before) == (rate, rates[i + 1])


@pytest.mark.parametrize("before,drops", [(16, 2), (196, 3)])
def test_walking_from_a_near_rate_finds_what_bisection_finds(before, drops):
    def cost(rate):
        return sum(k + k * k // 7 for k in kept_chain(rate, before, drops))

    for fraction in (0.31, 0.5, 0.65, 0.999):
        limit = Fraction(fraction) * cost(1.0)
        best = largest_rate(cost, limit, before)
        start = best
        for _ in range(3):  # a few steps off either way
            start = step_ends(start, before)[0] or start
        assert walk_to_largest(cost, limit, before, start, changes=10) == best
        start = best
        for _ in range(3):
            start = step_ends(start, before)[1] or start
        assert walk_to_largest(cost, limit, before, start, changes=10) == best
        assert walk_to_largest(cost, limit, before, 1 / before, changes=1) in (None, best)  # far off: gives up


@pytest.mark.parametrize("target", [0.5, 0.72, 0.9])
def test_merge_budget_choice_is_the_best_single_rate_in_few_rewrites(model, target, monkeypatch):
    # a merge's matching costs (n - k) k C: the cost model is off by a little, and the search steps on counts
    config = Config(target_flops=target, at=(0, 2), reduce="merge")
    measure = _search(model, config)
    by_chain = {}
    for rate in candidate_rates(measure.before):
        by_chain.setdefault(kept_chain(rate, measure.before, 2), rate)
    best = max(t for t in (measure.total(rate) for rate in by_chain.values()) if t <= target * measure.original)
    import repshift_fx.pipeline as pipeline
    rewrites, rewrite_ = [], pipeline.rewrite
    monkeypatch.setattr(pipeline, "rewrite", lambda m, x, c: rewrites.append(c.keep) or rewrite_(m, x, c))
    chosen, result = plan_for_budget(model, X, config)
    assert round(result.gflops_after * 1e9) == best and result.reached <= target
    assert len(rewrites) <= 6 < len(by_chain)  # the unpruned one, three for the cost model, a count, a step
