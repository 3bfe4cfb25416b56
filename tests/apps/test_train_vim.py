"""tools/train_fmnist_vim.py: the Fashion-MNIST ViM builds, its training scan is the example's scan, a
missing checkpoint fails cleanly, and one training step gives a checkpoint the pass can prune."""
import repshift_fx  # noqa: F401  (before timm)

import pytest
import torch

import train_fmnist_vim as tv  # tools/ is on the tests' pythonpath (pyproject.toml)
from train_fmnist_vit import ROOT


def test_model_shape_and_missing_checkpoint(tmp_path):
    model = tv.build_model().eval()
    assert model.token_position == 24 and len(model.layers) == tv.MODEL_KWARGS["depth"]
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(FileNotFoundError, match="tools/train_fmnist_vim.py"):
        tv.load_trained(tmp_path / "missing.pt")


def test_recurrent_scan_is_the_selective_scan():
    g = torch.Generator().manual_seed(0)
    u, B, C = (torch.randn(2, 50, s, generator=g, dtype=torch.float64) for s in (16, 8, 8))
    dt = torch.nn.functional.softplus(torch.randn(2, 50, 16, generator=g, dtype=torch.float64))
    A, D = -torch.rand(16, 8, generator=g, dtype=torch.float64) * 4, torch.randn(16, generator=g, dtype=torch.float64)
    torch.testing.assert_close(tv.recurrent_scan(u, dt, A, B, C, D), tv.selective_scan(u, dt, A, B, C, D),
                               rtol=1e-9, atol=1e-9)


def test_one_step_then_prune(tmp_path):
    if not (ROOT / "t10k-labels-idx1-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    torch.set_num_threads(1)
    ckpt = tv.train(tmp_path / "vim.pt", epochs=1, limit=32, batch=32)
    assert ckpt["steps"] == 1 and 0 <= ckpt["test_acc"] <= 1
    model = tv.load_trained(tmp_path / "vim.pt")
    assert model.pretrained_cfg["input_size"] == (1, 28, 28)
    x = torch.randn(2, 1, 28, 28)
    report = repshift_fx.inspect(model, x, keep=0.7)
    assert report.tokens[0] == 50 and report.tokens[-1] < 50
