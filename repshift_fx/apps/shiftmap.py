"""Shift maps: the per-token Representation Shift of one block, drawn over the image.

    smap = token_shift(model, x, block=3, keep=0.7)       # scores (h, w), kept (h, w)
    picture = render(photo, smap, scale=2)                 # PIL image: heat map | kept tokens
    picture.save("map.png")

The scores are read from the rewritten graph itself (`compress(..., compile=False)` run by a
`torch.fx.Interpreter` that keeps every value): the values of `repshift_score_{block}` (B, N)
and `repshift_index_{block}` (B, prefix + keep). Prefix tokens (CLS, registers) are left out;
the patch tokens are laid on the h x w grid of the image.

The picture is two panels of (W * scale) x (H * scale) pixels side by side, GAP pixels apart:
the shift as a heat map blended over the photo, and the photo with the dropped tokens dimmed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.fx
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from repshift_fx.errors import RepShiftError
from repshift_fx.apps.specs import SpecError
from repshift_fx.api import compress

GAP = 8
# inferno, sampled at 0, 1/6, ..., 1 (RGB 0-255); interpolated linearly in between
_INFERNO = np.array([(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21),
                     (250, 193, 39), (252, 255, 164)], dtype=np.float64)


@dataclass
class ShiftMap:
    scores: np.ndarray  # (h, w) float: the shift of each patch token
    kept: np.ndarray  # (h, w) bool: kept at the chosen rate
    block: int
    prefix: int  # prefix tokens left out of the map
    keep: int  # patch tokens kept

    @property
    def tokens(self) -> int:
        return self.scores.size


def grid(tokens: int, height: int, width: int) -> tuple[int, int]:
    """(h, w) with h * w == tokens and h / w as close as possible to height / width."""
    h = max(1, round(math.sqrt(tokens * height / width)))
    for candidate in sorted(range(1, tokens + 1), key=lambda c: abs(c - h)):
        if tokens % candidate == 0:
            return candidate, tokens // candidate
    return tokens, 1


def rewritten_values(model: torch.nn.Module, x, block: int, *, keep=0.7, **config):
    """(the graph `compress(..., at=(block,), compile=False)` rewrites, every value it computes
    on the first sample of x, a tensor or a tuple of them): the score and index nodes' values
    are what the maps draw."""
    args = tuple(t[:1] for t in x) if isinstance(x, tuple) else (x[:1],)
    gm = compress(model, args, keep=keep, at=(block,), compile=False, **config)
    runner = torch.fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        runner.run(*args)
    return gm, {node.name: value for node, value in runner.env.items()}


def token_shift(model: torch.nn.Module, x: torch.Tensor, block: int, *, keep: float = 0.7, **config) -> ShiftMap:
    """The shift of every patch token at `block` for the first image of x (B, C, H, W)."""
    gm, values = rewritten_values(model, x, block, keep=keep, **config)
    return token_map(gm, values, x, block)


def token_map(gm: torch.fx.GraphModule, values: dict, x: torch.Tensor, block: int) -> ShiftMap:
    """The ShiftMap of `block` from the values of a rewritten graph (`rewritten_values`)."""
    if gm.report.mode != "tokens" or f"repshift_score_{block}" not in values:
        raise RepShiftError(f"{gm.report.model} is pruned line-wise (rows and columns of CNN maps), not by "
                            "tokens; draw its row and column scores with shiftmap_lines.line_shift_map")
    scores, index = values[f"repshift_score_{block}"][0], values[f"repshift_index_{block}"][0]  # (N,), (P + K,)
    prefix = gm.report.prefix
    kept = torch.zeros(scores.shape[0], dtype=torch.bool)
    kept[index] = True
    n = scores.shape[0] - prefix
    h, w = grid(n, x.shape[-2], x.shape[-1]) if x.dim() == 4 else (n, 1)
    if x.dim() == 4 and abs(h / w - x.shape[-2] / x.shape[-1]) > 0.5:
        raise RepShiftError(f"block {block} has {n} patch tokens, which do not tile the {x.shape[-2]}x{x.shape[-1]} "
                            "image; shift maps need a model whose tokens are image patches")
    return ShiftMap(scores[prefix:].float().reshape(h, w).numpy(), kept[prefix:].reshape(h, w).numpy(), block,
                    prefix, int(index.numel() - prefix))


def load_image(path, size: tuple[int, int], mean, std, channels: int = 3) -> tuple[torch.Tensor, Image.Image]:
    """The image at `path`, centre-cropped to the aspect of size (H, W) and resized to it:
    the normalised tensor (1, C, H, W) and the photo (RGB) it came from."""
    try:
        with Image.open(Path(path)) as opened:
            photo = opened.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise SpecError(f"cannot read image {str(path)!r}: {err}") from None
    height, width = size
    photo = ImageOps.fit(photo, (width, height), method=Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(photo.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255)
    pixels = pixels.reshape(height, width, -1).permute(2, 0, 1)
    mean = torch.tensor(mean[:channels]).reshape(-1, 1, 1)
    std = torch.tensor(std[:channels]).reshape(-1, 1, 1)
    return ((pixels - mean) / std).unsqueeze(0), photo


def colormap(values: np.ndarray) -> np.ndarray:
    """values in [0, 1], any shape -> uint8 RGB (..., 3), inferno-like."""
    position = np.clip(values, 0, 1) * (len(_INFERNO) - 1)
    low = np.floor(position).astype(int).clip(0, len(_INFERNO) - 2)
    frac = (position - low)[..., None]
    return (_INFERNO[low] * (1 - frac) + _INFERNO[low + 1] * frac).round().astype(np.uint8)


def _tokens_to_pixels(image: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """A per-token (h, w[, 3]) uint8 array as an image of `size` (W, H), one block per token."""
    return Image.fromarray(image).resize(size, Image.Resampling.NEAREST)


def _label(picture: Image.Image, text: str, at: tuple[int, int]) -> None:
    draw = ImageDraw.Draw(picture)
    left, top, right, bottom = draw.textbbox(at, text)
    draw.rectangle((left - 3, top - 3, right + 3, bottom + 3), fill=(0, 0, 0))
    draw.text(at, text, fill=(255, 255, 255))


def render(photo: Image.Image, smap: ShiftMap, scale: int = 2, title: str = "") -> Image.Image:
    """Heat map of the shift over the photo | the photo with the dropped tokens dimmed.

    Size: (2 * W * scale + GAP) x (H * scale) for a W x H photo."""
    size = (photo.width * scale, photo.height * scale)
    base = photo.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    low, high = float(smap.scores.min()), float(smap.scores.max())
    norm = (smap.scores - low) / (high - low) if high > low else np.zeros_like(smap.scores)
    heat = Image.blend(base, _tokens_to_pixels(colormap(norm), size), alpha=0.6)
    shade = _tokens_to_pixels(np.where(smap.kept, 255, 70).astype(np.uint8), size)
    dimmed = Image.composite(base, Image.blend(base, Image.new("RGB", size, (20, 20, 40)), 0.75), shade)
    picture = Image.new("RGB", (2 * size[0] + GAP, size[1]), (255, 255, 255))
    picture.paste(heat, (0, 0))
    picture.paste(dimmed, (size[0] + GAP, 0))
    _label(picture, title or f"shift at block {smap.block}", (6, 6))
    _label(picture, f"kept {smap.keep} of {smap.tokens} tokens", (size[0] + GAP + 6, 6))
    return picture
