"""Fashion-MNIST scenes: each garment small, somewhere on a natural photo, so that most of the
image is background and which tokens a reduction keeps decides what the model still sees.

    data = fashion_scenes("test", limit=2000)        # "fashion-scenes" in load_dataset
    data.images(range(4))                            # 112 x 112 x 3 uint8, label = the garment's class

Image i of a split is fixed by (split, i) alone: the garment (Fashion-MNIST image i of that split)
is scaled to a side drawn in [SMALLEST, LARGEST] px, tinted, and blended (its grey level as alpha)
at a uniform position into a crop of a scikit-image photo (crop position and scale drawn too).
Train and test draw from Fashion-MNIST's own train and test splits, and from different photos.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch
import torch.nn.functional as F

from repshift_fx.apps.data.datasets import FASHION_CLASSES, DataError, Dataset, fashion_mnist

SIZE = 112
SMALLEST, LARGEST = 48, 96  # the garment's side, px: from under half to most of the image's
BACKGROUND_LEVEL = 0.6  # the photo darkened, so that a bright garment stands out on any of them
BACKGROUNDS = {"train": ("astronaut", "coffee", "chelsea", "rocket", "brick", "grass", "gravel", "hubble_deep_field"),
               "test": ("immunohistochemistry", "retina", "camera", "coins", "moon", "page", "text", "clock", "cell")}


def _photo(name: str) -> torch.Tensor:
    import skimage.data

    pixels = torch.from_numpy(np.asarray(getattr(skimage.data, name)(), dtype=np.float32)) / 255
    pixels = pixels[..., None].expand(-1, -1, 3) if pixels.dim() == 2 else pixels[..., :3]
    return pixels.permute(2, 0, 1).contiguous()


def _scene(garment: np.ndarray, photos: list[torch.Tensor], rng: np.random.Generator) -> np.ndarray:
    photo = photos[rng.integers(len(photos))]
    _, h, w = photo.shape
    crop = int(rng.uniform(0.3, 1.0) * min(h, w))
    top, left = rng.integers(h - crop + 1), rng.integers(w - crop + 1)
    canvas = F.interpolate(photo[None, :, top:top + crop, left:left + crop], size=(SIZE, SIZE), mode="bilinear",
                           antialias=True, align_corners=False)[0] * BACKGROUND_LEVEL
    side = int(rng.integers(SMALLEST, LARGEST + 1))
    alpha = F.interpolate(torch.from_numpy(garment.astype(np.float32) / 255)[None, None], size=(side, side),
                          mode="bilinear", antialias=True, align_corners=False)[0]
    tint = torch.from_numpy(rng.uniform(0.6, 1.0, size=(3, 1, 1)).astype(np.float32))
    y, x = rng.integers(SIZE - side + 1), rng.integers(SIZE - side + 1)
    patch = canvas[:, y:y + side, x:x + side]
    canvas[:, y:y + side, x:x + side] = alpha * tint + (1 - alpha) * patch
    return (canvas.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def fashion_scenes(split: str = "test", limit: int | None = None) -> Dataset:
    """Fashion-MNIST garments on scikit-image photos, 112 x 112 colour, the garment's 10 classes."""
    garments = fashion_mnist(split, limit)
    try:
        photos = [_photo(name) for name in BACKGROUNDS[split]]
    except ImportError:
        raise DataError("fashion-scenes needs scikit-image's photos: pip install -c constraints.txt "
                        "scikit-image") from None
    seed = zlib.crc32(split.encode())

    def load(i: int) -> np.ndarray:
        return _scene(garments.load(i), photos, np.random.default_rng((seed, i)))

    return Dataset(f"fashion-scenes/{split}", garments.labels, FASHION_CLASSES, load)
