"""Labelled data sets for measuring what pruning costs in accuracy (`repshift_fx.apps.evaluation.images`).

    data = load_dataset("fashion-mnist", split="test", limit=500)     # Debian dataset-fashion-mnist
    data = load_dataset("folder:/path/to/imagenet-val-subset")         # one sub-folder per class
    data = load_dataset("skimage")                                     # scikit-image's bundled photos
    data = load_dataset("fashion-scenes", split="test", limit=2000)    # garments small on photos, 112 px
    pixels = data.images(range(8))                                     # (8, C, H, W) uint8
    x = to_model_input(pixels, (3, 224, 224), mean, std)               # (8, 3, 224, 224) float

Nothing is downloaded or installed here; a missing source is a `DataError` that says which
package to install. WordNet is text, for text models (`repshift_fx.apps.evaluation.text`):

    data = load_dataset("wordnet", split="train", limit=2000)          # Debian wordnet-base
    data.texts[:2], data.labels[:2]                                    # definitions, 41 categories
"""
from __future__ import annotations

import gzip
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from repshift_fx.apps.data import wordnet
from repshift_fx.errors import RepShiftError

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
WORDNET = wordnet.WORDNET
WORDNET_CLASSES = tuple(name for name in wordnet.LEXNAMES if name.startswith(("noun.", "verb.")))  # 41
WORDNET_TEST_SHARE = 5  # one synset in 5 is a test one
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
                  "colorwheel", "camera", "clock", "coins", "moon", "brick", "grass", "gravel", "page", "text", "cell")
_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


class DataError(RepShiftError):
    """A data set that is not installed, not found or not readable."""


@dataclass
class Dataset:
    """Images with integer labels; `load(i)` gives image i as an (H, W) or (H, W, C) uint8 array."""

    name: str
    labels: torch.Tensor  # (N,) int64
    classes: tuple[str, ...]
    load: Callable[[int], np.ndarray]

    def __len__(self) -> int:
        return len(self.labels)

    def images(self, indices: Sequence[int]) -> list[np.ndarray]:
        return [self.load(int(i)) for i in indices]


@dataclass
class TextDataset:
    """Texts with integer labels."""

    name: str
    labels: torch.Tensor  # (N,) int64
    classes: tuple[str, ...]
    texts: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def read_idx(path: Path) -> np.ndarray:
    """A gzipped IDX file (MNIST's format): big-endian magic, sizes, then the data as uint8."""
    with gzip.open(path, "rb") as file:
        data = file.read()
    zero, kind, rank = struct.unpack(">HBB", data[:4])
    if zero != 0 or kind != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    sizes = struct.unpack(f">{rank}I", data[4:4 + 4 * rank])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank).reshape(sizes)


def fashion_mnist(split: str = "test", limit: int | None = None, root: Path = FASHION_MNIST) -> Dataset:
    """Fashion-MNIST from Debian's `dataset-fashion-mnist`: 28 x 28 grey images, 10 classes.
    split: "train" (60,000) or "test" (10,000); limit: the first `limit` images."""
    stem = {"train": "train", "test": "t10k"}.get(split)
    if stem is None:
        raise DataError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    images_path, labels_path = root / f"{stem}-images-idx3-ubyte.gz", root / f"{stem}-labels-idx1-ubyte.gz"
    if not images_path.exists() or not labels_path.exists():
        raise DataError(f"Fashion-MNIST is not installed ({images_path} is missing): "
                        "apt-get install dataset-fashion-mnist (Debian)")
    images, labels = read_idx(images_path)[:limit], read_idx(labels_path)[:limit]
    return Dataset(f"fashion-mnist/{split}", torch.from_numpy(labels.astype(np.int64)), FASHION_CLASSES,
                   lambda i: images[i])


def image_folder(path: str | Path, limit: int | None = None) -> Dataset:
    """An ImageFolder directory: one sub-folder per class (sorted names are the labels 0, 1, ...)."""
    from PIL import Image

    root = Path(path)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    files = [(f, c) for c, name in enumerate(classes) for f in sorted((root / name).rglob("*"))
             if f.suffix.lower() in _SUFFIXES]
    if not files:
        raise DataError(f"{str(root)!r} holds no images in class sub-folders (root/CLASS/IMAGE.jpg)")
    files = files[:limit] if limit is None else _interleave(files, limit)

    def load(i: int) -> np.ndarray:
        try:
            with Image.open(files[i][0]) as image:
                return np.asarray(image.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as error:  # PIL's errors for a truncated or corrupt file
            raise DataError(f"cannot read the image {str(files[i][0])!r}: {error}. Remove or replace it") from None

    return Dataset(f"folder:{root}", torch.tensor([c for _, c in files]), tuple(classes), load)


def _interleave(files: list, limit: int) -> list:
    """At most `limit` files taken round-robin over the classes (a --limit keeps every class)."""
    by_class: dict[int, list] = {}
    for item in files:
        by_class.setdefault(item[1], []).append(item)
    queues, picked = list(by_class.values()), []
    while len(picked) < limit and any(queues):
        for queue in queues:
            if queue and len(picked) < limit:
                picked.append(queue.pop(0))
    return sorted(picked, key=lambda item: (item[1], str(item[0])))


def skimage_photos(limit: int | None = None) -> Dataset:
    """scikit-image's bundled photos; each photo is its own class (for agreement, not accuracy)."""
    try:
        import skimage.data
    except ImportError:
        raise DataError("scikit-image is not installed: pip install -c constraints.txt scikit-image") from None
    names = SKIMAGE_PHOTOS[:limit]
    return Dataset("skimage", torch.arange(len(names)), names, lambda i: getattr(skimage.data, names[i])())


# --- fashion-scenes: Fashion-MNIST garments small on natural photos (most of an image is background,
# so which tokens a reduction keeps decides what the model still sees) ---

SCENE_SIZE = 112
SMALLEST, LARGEST = 48, 96  # the garment's side, px: from under half to most of the image's
BACKGROUND_LEVEL = 0.6  # the photo darkened, so that a bright garment stands out on any of them
BACKGROUNDS = {"train": ("astronaut", "coffee", "chelsea", "rocket", "brick", "grass", "gravel", "hubble_deep_field"),
               "test": ("immunohistochemistry", "retina", "camera", "coins", "moon", "page", "text", "clock", "cell")}


def _photo(name: str) -> torch.Tensor:
    import skimage.data

    pixels = torch.from_numpy(np.asarray(getattr(skimage.data, name)(), dtype=np.float32)) / 255
    pixels = pixels[..., None].expand(-1, -1, 3) if pixels.dim() == 2 else pixels[..., :3]
    return pixels.permute(2, 0, 1).contiguous()


def _scene(garment: np.ndarray, photos: list[torch.Tensor], rng: np.random.Generator,
           sides: tuple[int, int]) -> np.ndarray:
    photo = photos[rng.integers(len(photos))]
    _, h, w = photo.shape
    crop = int(rng.uniform(0.3, 1.0) * min(h, w))
    top, left = rng.integers(h - crop + 1), rng.integers(w - crop + 1)
    canvas = F.interpolate(photo[None, :, top:top + crop, left:left + crop], size=(SCENE_SIZE, SCENE_SIZE), mode="bilinear",
                           antialias=True, align_corners=False)[0] * BACKGROUND_LEVEL
    side = int(rng.integers(sides[0], sides[1] + 1))
    alpha = F.interpolate(torch.from_numpy(garment.astype(np.float32) / 255)[None, None], size=(side, side),
                          mode="bilinear", antialias=True, align_corners=False)[0]
    tint = torch.from_numpy(rng.uniform(0.6, 1.0, size=(3, 1, 1)).astype(np.float32))
    y, x = rng.integers(SCENE_SIZE - side + 1), rng.integers(SCENE_SIZE - side + 1)
    patch = canvas[:, y:y + side, x:x + side]
    canvas[:, y:y + side, x:x + side] = alpha * tint + (1 - alpha) * patch
    return (canvas.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def fashion_scenes(split: str = "test", limit: int | None = None, sides: tuple[int, int] = (SMALLEST, LARGEST)) -> Dataset:
    """Fashion-MNIST garments on scikit-image photos, 112 x 112 colour, the garment's 10 classes.

    Image i of a split is fixed by (split, i) alone: the garment (Fashion-MNIST image i of that
    split) is scaled to a side drawn in `sides` px (both included), tinted, and blended (its grey
    level as alpha) at a uniform position into a crop of a scikit-image photo (crop position and
    scale drawn too). Train and test draw from Fashion-MNIST's own splits and from different photos;
    the same draws for any `sides` (only the garment's scale differs)."""
    garments = fashion_mnist(split, limit)
    try:
        photos = [_photo(name) for name in BACKGROUNDS[split]]
    except ImportError:
        raise DataError("fashion-scenes needs scikit-image's photos: pip install -c constraints.txt "
                        "scikit-image") from None
    seed = zlib.crc32(split.encode())

    def load(i: int) -> np.ndarray:
        return _scene(garments.load(i), photos, np.random.default_rng((seed, i)), sides)

    name = "fashion-scenes" if sides == (SMALLEST, LARGEST) else f"fashion-scenes:{sides[0]}-{sides[1]}"
    return Dataset(f"{name}/{split}", garments.labels, FASHION_CLASSES, load)


def _scene_sides(spec: str) -> tuple[int, int]:
    """'fashion-scenes:24-48' -> (24, 48): the garment's side range in px, within the 112 px image."""
    match = re.fullmatch(r"fashion-scenes:(\d+)-(\d+)", spec)
    sides = match and (int(match[1]), int(match[2]))
    if not sides or not 1 <= sides[0] <= sides[1] <= SCENE_SIZE:
        raise DataError(f"{spec!r}: give fashion-scenes:MIN-MAX, the garment's side in px, "
                        f"1 <= MIN <= MAX <= {SCENE_SIZE} (fashion-scenes alone: {SMALLEST}-{LARGEST})")
    return sides


def load_dataset(spec: str, split: str = "test", limit: int | None = None) -> Dataset | TextDataset:
    """'fashion-mnist', 'fashion-scenes' (its garments small on photos; 'fashion-scenes:24-48' for
    garments of 24 to 48 px), 'skimage' or 'folder:PATH' (a split sub-folder PATH/<split> is used
    when present): images; 'wordnet': text (a `TextDataset`)."""
    if spec == "fashion-mnist":
        return fashion_mnist(split, limit)
    if spec == "skimage":
        return skimage_photos(limit)
    if spec == "fashion-scenes":
        return fashion_scenes(split, limit)
    if spec.startswith("fashion-scenes:"):
        return fashion_scenes(split, limit, _scene_sides(spec))
    if spec.startswith("folder:"):
        root = Path(spec[len("folder:"):])
        return image_folder(root / split if (root / split).is_dir() else root, limit)
    if spec == "wordnet":
        return wordnet_definitions(split, limit)
    raise DataError(f"unknown data set {spec!r}: give fashion-mnist, fashion-scenes, skimage, folder:PATH or "
                    "wordnet (text)")


def to_model_input(images: list[np.ndarray], shape: tuple[int, int, int], mean, std) -> torch.Tensor:
    """uint8 images of any size, grey or colour -> (B, C, H, W) float, resized and normalised.

    Each image is resized (bilinear, antialiased) to H x W; grey images are repeated over the C
    channels, colour ones lose any alpha channel; then (x / 255 - mean) / std per channel."""
    channels, height, width = shape
    batch = []
    for image in images:
        pixels = torch.from_numpy(np.array(image, dtype=np.float32)) / 255  # a copy: IDX arrays are read-only
        pixels = pixels.unsqueeze(0) if pixels.dim() == 2 else pixels.permute(2, 0, 1)[:3]
        if pixels.shape[0] != channels:
            pixels = pixels.mean(0, keepdim=True).expand(channels, -1, -1)
        batch.append(F.interpolate(pixels[None], size=(height, width), mode="bilinear", antialias=True,
                                   align_corners=False)[0])
    x = torch.stack(batch)
    mean = torch.tensor(mean[:channels] if len(mean) >= channels else mean[:1] * channels).reshape(1, -1, 1, 1)
    std = torch.tensor(std[:channels] if len(std) >= channels else std[:1] * channels).reshape(1, -1, 1, 1)
    return (x - mean) / std


def in_wordnet_test_split(synset: wordnet.Synset) -> bool:
    """The split of a synset, fixed by its part of speech and offset alone: test when the CRC-32 of
    "n:00001740" (pos:offset) is a multiple of WORDNET_TEST_SHARE (about one synset in 5)."""
    return zlib.crc32(f"{synset.pos}:{synset.offset:08d}".encode()) % WORDNET_TEST_SHARE == 0


def wordnet_definitions(split: str = "test", limit: int | None = None, root: Path = WORDNET) -> TextDataset:
    """Noun and verb definitions from Debian's `wordnet-base` (the gloss before its quoted
    examples), each labelled with its lexicographer category (41: noun.animal, verb.motion, ...).

    split: "test" (about 19,200 synsets) or "train" (about 76,700), by `in_wordnet_test_split`;
    limit: every k-th definition of the split, in file order, which is grouped by category, so each
    category keeps its share."""
    if split not in ("train", "test"):
        raise DataError(f"WordNet split must be 'train' or 'test', got {split!r}")
    test = split == "test"
    try:
        picked = [s for part in ("noun", "verb") for s in wordnet.synsets(part, root)
                  if s.definition and in_wordnet_test_split(s) == test]
    except wordnet.WordNetMissing as err:
        raise DataError(f"WordNet is not installed: {err} (Debian)") from err
    if limit is not None:
        if limit <= 0:
            raise DataError(f"the WordNet limit must be positive, got {limit}")
        picked = wordnet.every_kth(picked, limit)
    index = {name: i for i, name in enumerate(WORDNET_CLASSES)}
    return TextDataset(f"wordnet/{split}", torch.tensor([index[s.category] for s in picked]), WORDNET_CLASSES,
                       [s.definition for s in picked])


def image_batches(data, samples: int, batch: int, shape: tuple[int, int, int], mean, std) -> list[torch.Tensor]:
    """The first `samples` images of `data` as model inputs (`to_model_input`), `batch` at a time."""
    n = min(samples, len(data))
    return [to_model_input(data.images(range(s, min(s + batch, n))), shape, mean, std) for s in range(0, n, batch)]
