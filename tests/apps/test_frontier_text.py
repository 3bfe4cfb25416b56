"""tools/frontier.py on a text encoder (MiniLM-L6, real weights, WordNet): a file of its own so that
the suite's workers (--dist loadfile) run it beside the real ViT's tests, not after them."""
import json

from conftest import load_tool


def test_frontier_tool_measures_a_text_encoder_batch_by_batch(tmp_path):
    """The same tool on MiniLM and WordNet: every test batch compressed for itself, FLOPs per text."""
    frontier = load_tool("frontier")
    out = tmp_path / "frontier"
    frontier.main(["--spec", "hf:minilm", "--data", "wordnet", "--targets", "0.73", "--limit", "24", "--train-limit",
                   "60", "--calibrate", "0", "--batch", "12", "--threads", "1", "--out", str(out),
                   "--cache", str(tmp_path / "cache")])
    rows = json.loads((out / "frontier.json").read_text())
    assert [r["label"] for r in rows] == list(frontier.FIXED)
    for r in rows:
        assert 0.5 < r["flop_ratio"] <= 0.73 + 1e-6 and 0 < r["cosine"] <= 1 + 1e-6
    tome, stream, ward = (next(r for r in rows if r["label"] == label)
                          for label in ("ToMe", "ToMe on the stream", "ToMe by Ward's cost"))
    assert stream["config"]["merge_metric"] == "stream" and tome["config"]["score"] == "tome"
    assert ward["config"]["merge_metric"] == "ward"
    assert "24 test texts" in (out / "frontier.md").read_text()
