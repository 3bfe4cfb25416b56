"""The FLOP-budget planner in lines mode (CNNs): one rate for rows and columns at every drop,
the largest whose FLOPs, counted on the rewritten graph, are within target * original."""
import json
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import repshift_fx
from conftest import assert_unchanged, snapshot
from repshift_fx import ConfigError, UnsupportedSiteError
from repshift_fx.config import Config
from repshift_fx.pipeline import plan_for_budget, rewrite, rewrite_unpruned
from repshift_fx.apps.models import zoo as zoo_models
from repshift_fx.plan.budget import LineSearch
from repshift_fx.plan.line_grids import GridWalk
from repshift_fx.report.lines import build_line_report

X = torch.randn(1, 3, 128, 128)  # resnet18: grids 32, 16, 8, 4 (even: no count is refused)
SMALL = torch.randn(1, 3, 64, 64)  # grids 16, 8, 4, 2: half the schedules for the brute force to count


def flops(fn, x=X) -> int:
    """FLOPs of fn(x), counted by torch's own counter (no repshift_fx code involved)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(x)
    return counter.get_total_flops()


def every_end(search: LineSearch) -> list[float]:
    """Every rate j/m (m <= the largest side at a drop) where some kept count can change."""
    return sorted({j / m for m in range(1, search.before + 1) for j in range(1, m + 1)})


def best_schedule(search: LineSearch) -> int:
    """Brute force: the most MACs of any rate's schedule within the budget (refused ones: infinite)."""
    return max(c for c in map(search.cost, every_end(search)) if c <= search.limit)


@pytest.mark.parametrize("at", [None, (1, 4)])  # default: one drop after block 2 (16x16); (1, 4): 32x32 and 8x8
def test_target_is_met_by_the_largest_rate(resnet18, at):
    before = snapshot(resnet18)
    gm = repshift_fx.compress(resnet18, X, target_flops=0.7, at=at, compile=False)
    assert_unchanged(resnet18, before)  # the search rewrites the model many times, never the model itself
    rate, at = gm.report.config["keep"], gm.report.config["at"]
    original = flops(resnet18)
    assert flops(gm) <= 0.7 * original
    assert rate < 1.0
    larger = repshift_fx.compress(resnet18, X, keep=rate + 1e-6, at=at, compile=False)  # the next step
    assert flops(larger) > 0.7 * original


@pytest.mark.parametrize("at,target", [(None, 0.7), ((1, 4), 0.7), ((1, 4), 0.5), ((0, 3, 6), 0.8)])
def test_choice_is_the_best_single_rate(resnet18, at, target):
    config, result = plan_for_budget(resnet18, SMALL, Config(target_flops=target, at=at))
    asked = Config(target_flops=target, at=at)
    search = LineSearch(resnet18, SMALL, asked, rewrite_unpruned(resnet18, SMALL, asked), rewrite)
    assert round(result.gflops_after * 1e9) == best_schedule(search) and result.reached <= target
    assert config.keep == result.keep and config.at == result.at and config.target_flops is None
    assert result.kept == search.schedule(result.keep)  # the schedule it learnt is the one the plan keeps
    report = repshift_fx.inspect(resnet18, SMALL, keep=config.keep, at=config.at)
    assert tuple(row.kept for row in report.blocks if row.scored) == result.kept
    assert report.flop_ratio == pytest.approx(result.reached, abs=1e-12)


def test_keep_rate_reproduces_the_graph(resnet18):
    gm = repshift_fx.compress(resnet18, X, target_flops=0.7, at=(1, 4), compile=False)
    again = repshift_fx.compress(resnet18, X, keep=gm.report.config["keep"], at=(1, 4), compile=False)
    assert gm.code == again.code
    with torch.no_grad():
        assert torch.equal(gm(X), again(X))
        assert gm(X).shape == resnet18(X).shape


def test_unreachable_target_names_the_lowest_ratio(resnet18):
    with pytest.raises(ConfigError, match="keeping one row and one column at every drop gives a FLOP ratio of") as info:
        repshift_fx.compress(resnet18, X, target_flops=0.05, compile=False)
    assert "target_flops=0.05 is below what any schedule at at=(2,) reaches" in str(info.value)
    least = float(re.search(r"Ask for at least ([0-9.]+)", str(info.value)).group(1))
    _, result = plan_for_budget(resnet18, X, Config(target_flops=least))  # what it names is reachable
    assert result.kept == ((1, 1),) and result.reached <= least


def test_report_shows_the_budget(resnet18):
    config, budget = plan_for_budget(resnet18, X, Config(target_flops=0.7, at=(1, 4)))
    gm, ctx = rewrite(resnet18, X, config)
    report = build_line_report(resnet18, gm, ctx, flops=True, budget=budget)
    kept = ", ".join(f"{r}x{c}" for r, c in budget.kept)
    text = str(report)
    assert (f"FLOP budget 0.7: reached ratio {budget.reached:.4f} with keep={budget.keep:.4f} for rows and columns "
            f"at (1, 4) (kept {kept} rows x columns)") in text
    assert "target_flops=0.7" in text.splitlines()[0]
    data = json.loads(json.dumps(report.to_dict()))
    assert data["budget"]["kept"] == [list(k) for k in budget.kept] and data["config"]["target_flops"] == 0.7
    assert data["flop_ratio"] == pytest.approx(data["budget"]["reached"], abs=1e-12)


@pytest.mark.parametrize("options,match", [
    ({"mode": "lines", "target_flops": 0.7, "keep": 0.7}, "give one"),
    ({"target_flops": 0.7, "keep": (0.5, 0.7)}, "give one"),
    ({"target_flops": 1.5}, r"\(0, 1\]"),
])
def test_bad_targets(resnet18, options, match):
    with pytest.raises(ConfigError, match=match):
        repshift_fx.compress(resnet18, X, compile=False, **options)


def test_forced_lines_mode_and_plan_without_keep(resnet18):
    gm = repshift_fx.compress(resnet18, X, mode="lines", target_flops=0.8, compile=False)
    assert flops(gm) <= 0.8 * flops(resnet18)
    with pytest.raises(ConfigError, match="needs the FLOPs measured on the model"):
        rewrite(resnet18, X, Config(target_flops=0.8))  # the pipeline alone cannot choose the rate


# --- counts a layer after the drop refuses: a kernel-2 stride-2 convolution takes only even counts ---


class _Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x):
        return torch.relu(x + self.body(x))


class _Patchy(nn.Module):
    """Two residual blocks, a patchifying kernel-2 stride-2 convolution, one more block, a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(_Block(8), _Block(8))
        self.down = nn.Conv2d(8, 16, 2, stride=2)
        self.last = _Block(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.last(self.down(self.blocks(self.stem(x)))).mean((2, 3)))


@pytest.fixture(scope="module")
def patchy():
    torch.manual_seed(0)
    return _Patchy().eval()


def test_refused_counts_are_passed_over(patchy):
    x = torch.randn(1, 3, 24, 24)
    with pytest.raises(UnsupportedSiteError, match="kernel 2, stride 2"):  # 17 of 24 rows: odd
        repshift_fx.compress(patchy, x, keep=0.7, at=(1,), compile=False)
    config, result = plan_for_budget(patchy, x, Config(target_flops=0.7, at=(1,)))
    asked = Config(target_flops=0.7, at=(1,))
    search = LineSearch(patchy, x, asked, rewrite_unpruned(patchy, x, asked), rewrite)
    assert round(result.gflops_after * 1e9) == best_schedule(search)
    assert search.refused and all(r % 2 == 0 and c % 2 == 0 for r, c in result.kept)
    gm = repshift_fx.compress(patchy, x, keep=config.keep, at=(1,), compile=False)
    assert flops(gm, x) <= 0.7 * flops(patchy, x)
    larger = [r for r in every_end(search) if r > result.keep and search.cost(r) != math.inf]
    assert flops(repshift_fx.compress(patchy, x, keep=larger[0], at=(1,), compile=False), x) > 0.7 * flops(patchy, x)
    with pytest.raises(ConfigError, match=r"keeping 2x2 rows x columns, the fewest the layers after the drops take, "
                                          r"gives a FLOP ratio of 0\.\d+"):
        plan_for_budget(patchy, x, Config(target_flops=0.3, at=(1,)))


def _walk_and_rewrite(model, x, at, rate):
    """(the walk's counts and refusal, the rewrite's counts and refusal) at one rate."""
    asked = Config(mode="lines", at=at)
    gm, ctx = rewrite_unpruned(model, x, asked)
    kept, refusal = GridWalk(gm, ctx.plan)([(rate, rate)] * len(ctx.plan.drops))
    try:
        _, done = rewrite(model, x, Config(mode="lines", at=at, keep=rate))
    except UnsupportedSiteError as error:
        return (kept, refusal is not None), (None, error.message)
    return (kept, refusal is not None), (tuple((d.keep_rows, d.keep_cols) for d in done.plan.drops), None)


@settings(max_examples=12, deadline=None)
@given(rate=st.floats(0.2, 1.0))
def test_the_grid_walk_predicts_what_the_rewrite_keeps_and_refuses(patchy, rate):
    """The planner's GridWalk, from the unpruned shapes alone, against the rewrite itself: the same
    counts where the rewrite takes them, a refusal where it refuses (kernel 2 stride 2, odd counts)."""
    (kept, refused), (done, error) = _walk_and_rewrite(patchy, torch.randn(1, 3, 24, 24), (0, 1), rate)
    assert refused == (error is not None), (rate, kept, error)
    assert error is not None or kept == done


def test_the_grid_walk_follows_convnext_channel_last_norms():
    """ConvNeXt permutes to channels-last for its norms and downsamples with kernel 2 stride 2: at
    0.45 the rewrite takes the counts, at 0.55 it refuses 5 rows before a downsampling."""
    model, x = zoo_models.BY_NAME["torchvision:convnext_tiny"].build()
    outcomes = []
    for rate in (0.45, 0.55):
        (kept, refused), (done, error) = _walk_and_rewrite(model, x, (6, 9, 17), rate)
        assert refused == (error is not None) and (error is not None or kept == done), (rate, kept, error)
        outcomes.append(refused)
    assert outcomes == [False, True]
