"""repshift_fx.calibrate: the chosen options meet the target, its figures are what an independent
eager run measures, the model is untouched, and bad input is refused in the user's words."""
import json
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import repshift_fx
from repshift_fx import Calibration, ConfigError, ExampleInputError
from repshift_fx.calibration.choice import paired_interval, within_noise_of
from repshift_fx.calibration.measure import Candidate, Measure
from repshift_fx.calibration.space import Space, at_moves
from conftest import assert_unchanged, random_batches, snapshot, tiny_timm

SPACE = {"reduce": ["drop", "merge"], "score": ["shift", "tome"], "at": "auto"}


@pytest.fixture(scope="module")
def batches():
    return random_batches(3, 8, seed=1)


@pytest.fixture(scope="module")
def calibrated(vit, batches):
    before = snapshot(vit)
    cal = repshift_fx.calibrate(vit, batches, target_flops=0.7, space=SPACE, max_candidates=8, screen=8, refine=2,
                                progress=False)
    assert_unchanged(vit, before)
    assert not vit.training
    return cal


def flops(fn, x) -> int:
    """Stock torch FLOP counting, attention as the math kernel's matmuls (the CPU flash kernel is not counted)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.inference_mode():
        fn(x[:1])
    return counter.get_total_flops()


def test_every_candidate_meets_the_flop_target_counted_independently(vit, batches, calibrated):
    measured = [c for c in calibrated.table if c.error is None]
    assert len(measured) >= 4
    for c in measured:
        gm = repshift_fx.compress(vit, batches[0], compile=False, **c.config)  # keep (or r) and at explicit
        ratio = flops(gm, batches[0]) / flops(vit, batches[0])
        assert ratio == pytest.approx(c.flops, rel=1e-6) and ratio <= 0.7


def test_the_chosen_agreement_is_what_an_eager_run_measures(vit, batches, calibrated):
    assert calibrated.objective == "top-1 agreement"  # a classifier's logits
    gm = repshift_fx.compress(vit, batches[0], compile=False, **calibrated.config)
    with torch.inference_mode():
        same = [(gm(x).argmax(1) == vit(x).argmax(1)).double() for x in batches]
    assert torch.cat(same).mean().item() == pytest.approx(calibrated.chosen.value)
    assert calibrated.chosen.rank() >= calibrated.paper.rank()  # never worse than where it started
    assert calibrated.paper.options == {"target_flops": 0.7}  # the paper's rule at the target


def test_the_search_screens_on_the_first_batch_and_chooses_among_the_fully_measured(calibrated):
    measured = [c for c in calibrated.table if c.error is None]
    full = [c for c in measured if c.samples == 24]
    assert calibrated.chosen in full and calibrated.paper in full and 2 <= len(full) <= 3
    assert all(c.samples == 8 for c in measured if c not in full)
    assert calibrated.chosen.rank() == max(c.rank() for c in full)


def test_a_candidate_that_misses_the_target_gives_its_place_to_the_next(vit, batches, monkeypatch):
    """Where the best screened candidates miss the FLOP target over every batch, the next in line is
    measured in full instead (the paper's rule, the one other candidate measured in full, was chosen
    when the few refined all missed: on MiniLM at 0.55 over texts of several lengths)."""
    fit, missed = Measure.fit, []

    def strict(self, candidate, target, steps=8):
        if len(missed) < 2 and "paper" not in candidate.role:
            missed.append(candidate.label)
            candidate.error = "misses the target"
            return candidate
        return fit(self, candidate, target, steps)

    monkeypatch.setattr(Measure, "fit", strict)
    cal = repshift_fx.calibrate(vit, batches, target_flops=0.7, space=SPACE, max_candidates=8, screen=8, refine=2,
                                progress=False)
    in_full = [c for c in cal.table if c.error is None and c.samples == cal.samples]
    assert len(missed) == 2 and cal.chosen.label not in missed
    assert len([c for c in in_full if "paper" not in c.role]) == 2
    assert cal.chosen.rank() == max(c.rank() for c in in_full)


def test_the_search_walks_every_dimension_of_the_space(calibrated):
    tried = [c.options for c in calibrated.table]
    assert any(o.get("reduce") == "merge" for o in tried)
    assert any(o.get("score") == "tome" for o in tried)
    assert any("at" in o for o in tried)  # moves around the default schedule
    assert len(tried) <= 8


def test_the_config_goes_to_compress_the_backend_and_json(vit, batches, calibrated, tmp_path):
    path = tmp_path / "runs" / "vit" / "tuned.json"  # its folders are created, as export() creates its own
    calibrated.save(path)
    loaded = Calibration.load(path)
    assert loaded.config == calibrated.config and len(loaded.table) == len(calibrated.table)
    saved = json.loads(path.read_text())
    assert saved["target_flops"] == 0.7 and set(saved["config"]) >= {"at"} and {"keep", "r"} & set(saved["config"])
    eager = repshift_fx.compress(vit, batches[0], compile=False, **loaded.config)
    compiled = torch.compile(vit, backend=repshift_fx.backend(**loaded.config))
    with torch.inference_mode():
        torch.testing.assert_close(compiled(batches[0]), eager(batches[0]), atol=1e-4, rtol=1e-4)
    calibrated.plot(tmp_path / "plots" / "frontier.png")
    assert (tmp_path / "plots" / "frontier.png").stat().st_size > 10_000
    assert "chosen" in str(calibrated) and "paper" in str(calibrated)


def test_the_note_names_what_the_samples_cannot_tell_from_the_choice(vit, batches, calibrated):
    chosen = calibrated.chosen
    full = [c for c in calibrated.table if c.error is None and c.samples == 24]
    gm = repshift_fx.compress(vit, batches[0], compile=False, **chosen.config)
    with torch.inference_mode():  # per-sample agreement, from an eager run
        same = torch.cat([(gm(x).argmax(1) == vit(x).argmax(1)).double() for x in batches])
    assert same.tolist() == chosen.per_sample
    tied = [c for c in full if c is not chosen and paired_interval(c.per_sample, chosen.per_sample)[2] >= 0]
    assert tied  # 24 samples tell few candidates apart
    assert f"from {len(tied)} other candidate(s)" in calibrated.notes[0] and tied[0].label in calibrated.notes[0]


@given(st.lists(st.tuples(st.integers(1, 4), st.lists(st.floats(0, 1), min_size=12, max_size=12)),
                min_size=1, max_size=6))
def test_without_labels_the_leader_is_chosen_and_the_ties_named(rows):
    candidates = [Candidate({f"o{k}": k for k in range(n)}, per_sample=values, samples=12, value=sum(values) / 12,
                            cosine=0.0, flops=0.5) for n, values in rows]
    ranked = sorted(candidates, key=Candidate.rank, reverse=True)
    chosen, notes = within_noise_of(ranked)
    tied = [c for c in ranked[1:] if paired_interval(c.per_sample, ranked[0].per_sample)[2] >= 0]
    assert chosen is ranked[0] and bool(notes) == bool(tied)
    assert not notes or f"from {len(tied)} other" in notes[0]


def test_a_leader_clear_of_the_noise_has_no_note():
    clear = Candidate({"a": 1, "b": 2}, per_sample=[1.0] * 40, samples=40, value=1.0, cosine=1.0, flops=0.5)
    worse = Candidate({}, per_sample=[1.0, 0.0] * 20, samples=40, value=0.5, cosine=0.9, flops=0.5)
    assert within_noise_of([clear, worse]) == (clear, [])


def test_features_are_compared_by_cosine(batches):
    encoder = tiny_timm("deit_tiny_patch16_224", depth=4, img_size=64, num_classes=0)
    cal = repshift_fx.calibrate(encoder, batches[:1], target_flops=0.8, space={"reduce": ["merge"]},
                                max_candidates=2, progress=False)
    assert cal.objective == "cosine similarity"
    gm = repshift_fx.compress(encoder, batches[0], compile=False, **cal.config)
    with torch.inference_mode():
        want = F.cosine_similarity(gm(batches[0]), encoder(batches[0]), dim=-1).mean().item()
    assert cal.chosen.value == pytest.approx(want, rel=1e-6)


def test_a_speed_target_out_of_reach_names_the_fastest(vit, batches):
    cal = repshift_fx.calibrate(vit, batches[:1], target_flops=0.7, target_speedup=50.0, space={"reduce": ["drop"]},
                                max_candidates=1, finalists=1, progress=False)
    assert cal.chosen.speedup is not None and cal.chosen.speedup < 50
    assert "no candidate reached 50.0x" in cal.notes[0] and cal.chosen.label in cal.notes[0]


def test_at_moves_stay_in_range_and_increasing():
    moves = at_moves((3, 6, 9), 12)
    assert (2, 5, 8) in moves and (4, 7, 10) in moves and (3, 9) in moves and (3, 6, 8, 9) not in moves
    assert tuple(range(3, 11)) in moves  # gradual: after every block from the first drop on
    assert all(list(m) == sorted(set(m)) and 0 <= m[0] and m[-1] <= 10 for m in moves)
    assert (0,) not in at_moves((0,), 2) and at_moves((0,), 2) == []


@pytest.mark.parametrize("current, tried", [
    ({"score": "tome"}, ["stream", "ward"]),               # ToMe's matching on the keys or the stream
    ({"reduce": "merge"}, ["stream", "ward"]),
    ({"score": "tome", "merge_metric": "stream"}, ["keys", "ward"]),
    ({"score": "shift"}, []),                              # a drop compares nothing
])
def test_what_a_merge_compares_is_a_dimension_wherever_tokens_merge(current, tried):
    space = Space.for_mode("tokens")
    assert "merge_metric" in space.dimensions()
    assert space.alternatives("merge_metric", current, depth=12) == tried


@pytest.mark.parametrize("kwargs, words", [
    (dict(), "needs a target"),
    (dict(target_flops=1.4), "pass target_speedup=1.4"),
    (dict(target_speedup=0.7), "pass target_flops=0.7"),
    (dict(target_flops=0.7, space={"reduse": ["merge"]}), "did you mean 'reduce'"),
    (dict(target_flops=0.7, space={"score": ["shfit"]}), "space['score'] holds 'shfit'"),
    (dict(target_flops=0.7, space={"reduce": []}), "space['reduce'] is empty: give the values to try"),
    (dict(target_flops=0.7, objective="accuracy"), "objective must be"),
    (dict(target_flops=0.01), "Ask for at least"),
    (dict(target_flops=0.7, keep=0.5), "leave keep= out"),
    (dict(target_speedup=1.2, score="tome", r=2), "leave r= out"),
])
def test_bad_options_are_refused_in_the_users_words(vit, batches, kwargs, words):
    before = snapshot(vit)
    with pytest.raises(ConfigError, match=None) as info:
        repshift_fx.calibrate(vit, batches[:1], progress=False, max_candidates=1,
                              **dict(kwargs, space=kwargs.get("space", {"reduce": ["drop"]})))
    assert words in str(info.value) and not re.search(r"%[a-z_]", str(info.value))  # no graph node named
    assert_unchanged(vit, before)


@pytest.mark.parametrize("given, words", [
    ([], "it got none"),
    ([torch.randn(2, 3, 64, 64), torch.randn(2, 3, 32, 32)], "batch 1 has shape input: (B, 3, 32, 32)"),
    ([{"input_ids": torch.ones(2, 5, dtype=torch.long)}, {"ids": torch.ones(2, 5, dtype=torch.long)}], "batch 1"),
    ([(torch.randn(2, 3, 64, 64), torch.randn(3, 3))], "batch sizes"),
])
def test_empty_or_mismatched_batches_say_which_and_what(vit, given, words):
    with pytest.raises(ExampleInputError) as info:
        repshift_fx.calibrate(vit, given, target_flops=0.7, progress=False)
    assert words in str(info.value)


@pytest.mark.parametrize("fixed", [{"reduce": "merge"}, {"score": "tome"}, {"score": "tome", "merge_metric": "ward"}])
def test_options_held_fixed_hold_in_every_candidate(vit, batches, fixed):
    """The default space tries ToMe, which takes no reduce=: with reduce held it is not tried; with
    score="tome" held, ToMe's r is what the search sets."""
    cal = repshift_fx.calibrate(vit, batches[:1], target_flops=0.8, max_candidates=4, progress=False, **fixed)
    measured = [c for c in cal.table if c.error is None]
    assert measured
    for c in measured:
        assert all(c.config.get(k) == v for k, v in fixed.items()), c.config
    assert all(cal.config.get(k) == v for k, v in fixed.items())
