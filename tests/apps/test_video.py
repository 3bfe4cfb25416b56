"""A video ViT (examples/video_vit.py): tubelet tokens over time x height x width, pruned across both."""
import torch

import repshift_fx
import video_vit  # examples/video_vit.py (examples/ is on the tests' pythonpath: pyproject.toml)
from conftest import assert_close

TINY = ["--frames", "4", "--size", "32", "--patch", "8", "--depth", "4", "--dim", "32", "--heads", "2", "--batch", "2",
        "--runs", "1"]


def tiny_video_vit():
    torch.manual_seed(0)
    return video_vit.VideoViT(frames=4, size=32, patch=8, tubelet=2, dim=32, depth=4, heads=2, classes=5).eval()


def test_keep_one_is_the_original():
    model, clip = tiny_video_vit(), torch.randn(2, 3, 4, 32, 32)
    gm = repshift_fx.compress(model, clip, keep=1.0, at=(0, 1, 2), compile=False)
    with torch.no_grad():
        assert_close(gm(clip), model(clip), tol=1e-5)


def test_inspect_shows_the_time_height_width_grid():
    report = repshift_fx.inspect(tiny_video_vit(), torch.randn(2, 3, 4, 32, 32), keep=0.5, at=(1, 2))
    assert report.tokens == [32, 32, 16, 8]
    assert "tokens: 2 x 4 x 4 (time x height x width) from Conv3d at 'patch_embed'" in str(report)


def test_example_prunes_across_space_and_time(capsys):
    result = video_vit.main(TINY)
    assert "time x height x width" in capsys.readouterr().out
    grid = result["grid"]
    assert grid == (2, 4, 4)
    for block, kept in {1: 16, 2: 8}.items():
        rows = result["kept"][block]
        assert all(sum(row) == kept and len(row) == grid[0] for row in rows)
    # each sample keeps its own tokens, and a time step keeps more or fewer than its share
    assert any(row != [16 // grid[0]] * grid[0] for row in result["kept"][1])
