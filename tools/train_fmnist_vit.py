"""A small CLS-token ViT trained from scratch on Fashion-MNIST: real weights for token-pruning checks.

    .venv/bin/python tools/train_fmnist_vit.py                   # train if results/fmnist_vit.pt is missing, then test
    .venv/bin/python tools/train_fmnist_vit.py --retrain --epochs 2
    .venv/bin/python tools/train_fmnist_vit.py --limit 2000      # smoke run -> results/fmnist_vit_smoke.pt
    .venv/bin/python tools/train_fmnist_vit.py --patch-size 2 --threads 2   # 196 tokens -> results/fmnist_vit_p2.pt
    .venv/bin/python tools/train_fmnist_vit.py --patch-size 7    # 16 tokens of 7x7 pixels -> results/fmnist_vit_p7.pt

From another tool (run from the repository root):

    from tools.train_fmnist_vit import load_trained, fmnist_tensors
    model = load_trained()                   # eval mode; FileNotFoundError naming the command if never trained
    x, y = fmnist_tensors("test", limit=500) # (500, 1, 28, 28) normalised float, (500,) int64

The model: 28x28 grey input, 4x4 patches -> 49 patch tokens + CLS, 8 blocks. With --patch-size 2 the same
model reads 2x2 patches: 196 patch tokens + CLS, as many as DeiT-S at 224 px, each holding less of the image. Data: Debian's
dataset-fashion-mnist (/usr/share/datasets/fashion-mnist), read here with a small IDX reader.
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import math
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm


def _torchvision_guard() -> None:
    """timm imports torchvision, which dies on this CPU torch unless repshift_fx's guard runs first. The guard's
    file (no imports of its own) is loaded alone, so this tool does not depend on the rest of the package."""
    path = Path(__file__).resolve().parents[1] / "repshift_fx" / "_torchvision_guard.py"
    if not path.exists():
        import repshift_fx  # noqa: F401  (installs the guard)
        return
    spec = importlib.util.spec_from_file_location("_fmnist_torchvision_guard", path)
    guard = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = guard  # keeps its torch.library.Library alive
    spec.loader.exec_module(guard)
    guard.install()


_torchvision_guard()
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

ROOT = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_CKPT = Path(__file__).resolve().parents[1] / "results" / "fmnist_vit.pt"
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST train set, pixels in [0, 1]
MODEL_KWARGS = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=8, num_heads=3,
                    mlp_ratio=4.0, class_token=True, global_pool="token")


def build_model(**overrides) -> VisionTransformer:
    """The untrained ViT (MODEL_KWARGS, any of them overridden)."""
    return VisionTransformer(**{**MODEL_KWARGS, **overrides})


def _idx(path: Path) -> np.ndarray:
    """A gzipped IDX file of unsigned bytes (MNIST's format)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, kind, rank = struct.unpack(">HBB", data[:4])
    assert zero == 0 and kind == 0x08, f"{path} is not an IDX file of unsigned bytes"
    sizes = struct.unpack(f">{rank}I", data[4:4 + 4 * rank])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * rank).reshape(sizes)


def fmnist_tensors(split: str = "test", limit: int | None = None, mean: float = MEAN, std: float = STD):
    """(x, y): x (N, 1, 28, 28) float32 normalised ((p/255 - mean) / std), y (N,) int64; split "train" or "test"."""
    stem = {"train": "train", "test": "t10k"}[split]
    if not (ROOT / f"{stem}-images-idx3-ubyte.gz").exists():
        raise FileNotFoundError(f"Fashion-MNIST missing under {ROOT}: apt-get install dataset-fashion-mnist")
    images = _idx(ROOT / f"{stem}-images-idx3-ubyte.gz")[:limit]
    labels = _idx(ROOT / f"{stem}-labels-idx1-ubyte.gz")[:limit]
    x = (torch.from_numpy(images.astype(np.float32)) / 255 - mean) / std
    return x.unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _augment(x: torch.Tensor) -> torch.Tensor:
    """Random 28x28 crop of the 2-pixel zero-padded (in pixel space) image, then a random horizontal flip."""
    n = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2), value=-MEAN / STD)  # pad with black
    oy, ox = torch.randint(0, 5, (n, 1)), torch.randint(0, 5, (n, 1))
    rows, cols = (oy + torch.arange(28))[:, :, None], (ox + torch.arange(28))[:, None, :]
    out = padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)
    return torch.where(torch.rand(n, 1, 1, 1) < 0.5, out.flip(3), out)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    hits = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    return hits / len(x)


def train(out: Path = DEFAULT_CKPT, epochs: float = 1.0, limit: int | None = None, lr: float = 2e-3,
          batch: int = 64, augment: str = "after-first", seed: int = 0, patch_size: int = 4) -> dict:
    """AdamW + 5% linear warmup + cosine decay, label smoothing 0.1, timm's "jax" init (xavier linears, zero
    head: learnt far faster here than the default); saves and returns the checkpoint dict. `epochs` may be
    fractional. augment ("never", "after-first", "always"): random crop (pad 2) + flip; "after-first" skips
    the first pass, where no image repeats and augmenting only slowed learning (120 steps: 50% vs 58%).
    Batch 64 beat 128 at equal samples and wall time (15k images: 66% vs 62%; a full epoch: 81.5% vs 69%
    with the earlier recipe); 32 led early but not after the epoch (81.4%, and slower)."""
    torch.manual_seed(seed)
    kwargs = {**MODEL_KWARGS, "patch_size": patch_size}
    model = build_model(weight_init="jax", patch_size=patch_size)
    return fit(model, out, kwargs, lambda name, p: p.ndim > 1 and "pos_embed" not in name, epochs=epochs,
               limit=limit, lr=lr, batch=batch, augment=augment)


def fit(model: torch.nn.Module, out: Path, model_kwargs: dict, decays, epochs: float = 1.0, limit: int | None = None,
        lr: float = 2e-3, batch: int = 64, augment: str = "after-first") -> dict:
    """The recipe of `train` on any Fashion-MNIST model (tools/train_fmnist_vim.py's too): AdamW with
    weight decay 0.05 on the parameters `decays(name, param)` picks, 5% warmup + cosine, label
    smoothing 0.1, clipping 1.0; saves the checkpoint (state dict, `model_kwargs`, test accuracy)
    to `out` and returns it."""
    x, y = fmnist_tensors("train", limit)
    xt, yt = fmnist_tensors("test", limit)
    decay = [p for n, p in model.named_parameters() if decays(n, p)]
    other = [p for n, p in model.named_parameters() if not decays(n, p)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}], lr=lr)
    per_epoch = math.ceil(len(x) / batch)
    total, warmup = max(1, round(epochs * per_epoch)), max(1, round(0.05 * epochs * per_epoch))

    def factor(s: int) -> float:  # linear warmup, then cosine to 0
        return (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    start, step, bar = time.time(), 0, tqdm(total=total, desc="train", mininterval=5, unit="step")
    for epoch in range(math.ceil(epochs)):
        model.train()
        aug = augment == "always" or (augment == "after-first" and epoch > 0)
        for idx in torch.randperm(len(x)).split(batch):
            loss = F.cross_entropy(model(_augment(x[idx]) if aug else x[idx]), y[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            bar.update()
            step += 1
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{sched.get_last_lr()[0]:.1e}", refresh=False)
            if step >= total:
                break
    bar.close()
    seconds = time.time() - start
    acc = accuracy(model, xt, yt)
    ckpt = dict(state_dict=model.state_dict(), model_kwargs=model_kwargs, mean=MEAN, std=STD, test_acc=acc,
                test_size=len(xt), train_seconds=seconds, epochs=epochs, steps=total, lr=lr, batch=batch,
                augment=augment, train_size=len(x), threads=torch.get_num_threads(), torch=str(torch.__version__))
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, out)
    print(f"trained {total} steps ({epochs} epochs) in {seconds:.0f} s; test accuracy {acc:.4f} -> {out}")
    return ckpt


def load_trained(path: str | Path = DEFAULT_CKPT, train_if_missing: bool = False) -> torch.nn.Module:
    """The trained ViT in eval mode. A missing checkpoint raises FileNotFoundError naming the command
    that makes it (7-8 min on one CPU thread), unless train_if_missing=True, which trains it here (with
    the caller's torch thread count)."""
    return load_checkpoint(path, build_model, train, "tools/train_fmnist_vit.py", train_if_missing)


def load_checkpoint(path: str | Path, build, train_fn, tool: str, train_if_missing: bool = False) -> torch.nn.Module:
    """`build(**model_kwargs)` with the checkpoint's weights, in eval mode, with the `pretrained_cfg`
    that `repshift-fx` and tools/evaluate.py read (input size, normalisation); a missing checkpoint is
    trained by `train_fn(path)` with `train_if_missing`, else a FileNotFoundError naming `tool`."""
    path = Path(path)
    if not path.exists():
        if not train_if_missing:
            raise FileNotFoundError(f"{path} is missing: run `.venv/bin/python {tool}`")
        train_fn(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = build(**ckpt["model_kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    model.pretrained_cfg = {"input_size": (1, 28, 28), "mean": (float(ckpt["mean"]),), "std": (float(ckpt["std"]),),
                            "num_classes": 10}
    return model.eval()


def main() -> None:
    run_cli(__doc__, DEFAULT_CKPT, train, load_trained,
            options={"--patch-size": dict(type=int, default=4, help="4 (49 tokens, default), 2 (196 tokens, "
                                                                    "checkpoint fmnist_vit_p2.pt by default) or 7 (16 tokens)")},
            suffix=lambda chosen: "" if chosen["patch_size"] == 4 else f"_p{chosen['patch_size']}")


def run_cli(doc: str, default_ckpt: Path, train_fn, load, note: str = "", options: dict | None = None,
            suffix=lambda chosen: "") -> None:
    """The command line of a Fashion-MNIST trainer: train unless the checkpoint exists (or --retrain),
    then print its test accuracy with `load(path)`. `options` adds arguments that go to `train_fn` by
    name; `suffix(their values)` is added to the default checkpoint's name."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    names = [parser.add_argument(flag, **spec).dest for flag, spec in (options or {}).items()]
    parser.add_argument("--epochs", type=float, default=1.0, help="may be fractional (default 1)")
    parser.add_argument("--out", type=Path, help=f"checkpoint (default {default_ckpt}; *_smoke.pt with --limit)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--limit", type=int, help="first N train and test images only (a smoke run)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--augment", choices=("never", "after-first", "always"), default="after-first")
    parser.add_argument("--retrain", action="store_true", help="train even if the checkpoint exists")
    args = parser.parse_args()
    extra = {name: getattr(args, name) for name in names}
    torch.set_num_threads(args.threads)
    stem = default_ckpt.stem + suffix(extra)
    out = args.out or default_ckpt.with_name(stem + ("_smoke.pt" if args.limit else ".pt"))
    if args.retrain or not out.exists():
        train_fn(out, args.epochs, args.limit, args.lr, args.batch, args.augment, **extra)
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    x, y = fmnist_tensors("test", args.limit, ckpt["mean"], ckpt["std"])
    acc = accuracy(load(out), x, y)
    print(f"{out}: {ckpt['model_kwargs']}\ntrained {ckpt['train_seconds']:.0f} s ({ckpt['epochs']} epochs, "
          f"{ckpt['threads']} thread(s)); test accuracy {acc:.4f} on {len(y)} images{note}")


if __name__ == "__main__":
    main()
