"""A small Vision Mamba (examples/vim.py's model) trained from scratch on Fashion-MNIST: real weights for ViM checks.

    .venv/bin/python tools/train_fmnist_vim.py                   # train if results/fmnist_vim.pt is missing, then test
    .venv/bin/python tools/train_fmnist_vim.py --retrain --epochs 2
    .venv/bin/python tools/train_fmnist_vim.py --limit 2000      # smoke run -> results/fmnist_vim_smoke.pt
    .venv/bin/python tools/evaluate.py tools.train_fmnist_vim:load_trained --head model --limit 2000 \\
        --scores shift,random --keeps 1.0,0.9,0.7 --threads 1    # from the repository root

The model: repshift_fx.apps.models.vim's VisionMamba on 28x28 grey input, 4x4 patches -> 49 patch
tokens with the class token in the middle (position 24 of 50), 6 blocks of dim 64, d_state 8. Data
and the training recipe are tools/train_fmnist_vit.py's (its IDX reader, augmentation and schedule).

Training runs the scan as its recurrence (`recurrent_scan`, a Python loop over the 50 tokens): on CPU
it is ~8x faster than the model's log-space `selective_scan` and its gradients are finite (the
log-space form's backward gives NaN: log(0) of the clamped parts feeds -inf into logcumsumexp).
Both compute the same function, so `load_trained` returns the model with `selective_scan`, the form
the pass recognises as an SSM (a prefix scan along the tokens).
"""
from __future__ import annotations

from pathlib import Path

if __package__:  # tools.train_fmnist_vim, a model spec from the repository root (tools/evaluate.py)
    from .train_fmnist_vit import fit, load_checkpoint, run_cli  # (installs the guard)
else:  # run as a script, or imported with tools/ on the path (the tests)
    from train_fmnist_vit import fit, load_checkpoint, run_cli  # (installs the guard)

import torch
from repshift_fx.apps.models.vim import VisionMamba, selective_scan
from torch import nn

_ROOT = Path(__file__).resolve().parents[1]

DEFAULT_CKPT = _ROOT / "results" / "fmnist_vim.pt"
MODEL_KWARGS = dict(size=28, patch=4, dim=64, depth=6, d_state=8, classes=10)


def recurrent_scan(u, dt, A, B, C, D):
    """The model's `selective_scan` as its recurrence h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t,
    with everything but the two-op update computed for all tokens at once (training only)."""
    decay = torch.exp(dt.unsqueeze(-1) * A)  # (batch, L, d, n)
    v = (dt * u).unsqueeze(-1) * B.unsqueeze(2)
    h, states = torch.zeros_like(v[:, 0]), []
    for a, b in zip(decay.unbind(1), v.unbind(1)):  # unbind: its backward is one stack, not L full-size zeros
        h = a * h + b
        states.append(h)
    return (torch.stack(states, 1) * C.unsqueeze(2)).sum(-1) + D * u


class FmnistVim(VisionMamba):
    """VisionMamba with a one-channel patch embedding (grey images)."""

    def __init__(self, size=28, patch=4, dim=64, depth=6, d_state=8, classes=10, scan=selective_scan):
        super().__init__(size, patch, dim, depth, d_state, classes, scan)
        self.patch_embed = nn.Conv2d(1, dim, patch, stride=patch)


def build_model(scan=selective_scan, **overrides) -> FmnistVim:
    """The untrained ViM (MODEL_KWARGS, any of them overridden)."""
    return FmnistVim(**{**MODEL_KWARGS, **overrides}, scan=scan)


def set_scan(model: VisionMamba, scan) -> VisionMamba:
    for layer in model.layers:
        layer.mixer.forward_scan.scan = layer.mixer.backward_scan.scan = scan
    return model


def train(out: Path = DEFAULT_CKPT, epochs: float = 1.0, limit: int | None = None, lr: float = 2e-3,
          batch: int = 64, augment: str = "after-first", seed: int = 0) -> dict:
    """AdamW (weight decay 0.05 on matrices and convolutions; none on A_log, D, norms, biases, the class
    token and position embeddings) + 5% linear warmup + cosine decay, label smoothing 0.1, gradient
    clipping 1.0: tools/train_fmnist_vit.py's recipe. Saves and returns the checkpoint dict."""
    torch.manual_seed(seed)
    model = build_model(scan=recurrent_scan)  # the accuracy in the checkpoint is the recurrent scan's: fast
    no_decay = ("A_log", "D", "pos_embed", "cls_token")
    return fit(model, Path(out), MODEL_KWARGS, lambda name, p: p.ndim > 1 and not name.endswith(no_decay),
               epochs=epochs, limit=limit, lr=lr, batch=batch, augment=augment)


def load_trained(path: str | Path = DEFAULT_CKPT, train_if_missing: bool = False, scan=selective_scan) -> nn.Module:
    """The trained ViM in eval mode, with the model's `selective_scan` (what the pass reads) unless
    `scan` says otherwise. A missing checkpoint raises FileNotFoundError naming the command that makes
    it, unless train_if_missing=True, which trains it here (with the caller's torch thread count)."""
    return load_checkpoint(path, lambda **kwargs: build_model(scan=scan, **kwargs), train, "tools/train_fmnist_vim.py",
                           train_if_missing)


def main() -> None:
    run_cli(__doc__, DEFAULT_CKPT, train, lambda path: load_trained(path, scan=recurrent_scan), " (recurrent scan)")


if __name__ == "__main__":
    main()
