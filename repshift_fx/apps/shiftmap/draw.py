"""Drawing shift maps: one picture per map, whatever the mode.

    picture = draw(smap, photo, scale=2, title="")   # PIL image; photo is None for text

- TokenMap: the shift as a heat map blended over the photo | the photo with the dropped tokens
  dimmed; (2 * W * scale + GAP) x (H * scale) for a W x H photo.
- LineMap: the position shift as a heat map, a strip of the row scores on its right and of the
  column scores below it (kept lines bright) | the photo with the dropped rows and columns dimmed;
  (2 * W * scale + STRIP + GAP) x (H * scale + STRIP).
- TextMap: one box per word piece, filled by its shift; dropped pieces grey and struck through;
  ROW_WIDTH wide, as many rows as needed.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from repshift_fx.apps.shiftmap.read import LineMap, TextMap, TokenMap

GAP, STRIP, PAD, ROW_WIDTH = 8, 14, 6, 720
# inferno, sampled at 0, 1/6, ..., 1 (RGB 0-255); interpolated linearly in between
_INFERNO = np.array([(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21),
                     (250, 193, 39), (252, 255, 164)], dtype=np.float64)


def draw(smap, photo: Image.Image | None = None, scale: int = 2, title: str = "") -> Image.Image:
    """The picture of a TokenMap or LineMap over `photo`, or of a TextMap."""
    if isinstance(smap, TextMap):
        return _draw_text(smap, title)
    if isinstance(smap, LineMap):
        return _draw_lines(photo, smap, scale, title)
    return _draw_tokens(photo, smap, scale, title)


def colormap(values: np.ndarray) -> np.ndarray:
    """values in [0, 1], any shape -> uint8 RGB (..., 3), inferno-like."""
    position = np.clip(values, 0, 1) * (len(_INFERNO) - 1)
    low = np.floor(position).astype(int).clip(0, len(_INFERNO) - 2)
    frac = (position - low)[..., None]
    return (_INFERNO[low] * (1 - frac) + _INFERNO[low + 1] * frac).round().astype(np.uint8)


def _normalise(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def _cells(image: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """A per-cell (h, w[, 3]) uint8 array as an image of `size` (W, H), one block per cell."""
    return Image.fromarray(image).resize(size, Image.Resampling.NEAREST)


def _label(picture: Image.Image, text: str, at: tuple[int, int]) -> None:
    draw_on = ImageDraw.Draw(picture)
    left, top, right, bottom = draw_on.textbbox(at, text)
    draw_on.rectangle((left - 3, top - 3, right + 3, bottom + 3), fill=(0, 0, 0))
    draw_on.text(at, text, fill=(255, 255, 255))


def _heat_and_dimmed(photo: Image.Image, scores: np.ndarray, kept: np.ndarray, scale: int):
    """(the photo scaled, the scores' heat map over it, the photo with the cells not kept dimmed)."""
    size = (photo.width * scale, photo.height * scale)
    base = photo.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    heat = Image.blend(base, _cells(colormap(_normalise(scores)), size), alpha=0.6)
    shade = _cells(np.where(kept, 255, 70).astype(np.uint8), size)
    dimmed = Image.composite(base, Image.blend(base, Image.new("RGB", size, (20, 20, 40)), 0.75), shade)
    return base, heat, dimmed


def _draw_tokens(photo: Image.Image, smap: TokenMap, scale: int, title: str) -> Image.Image:
    _, heat, dimmed = _heat_and_dimmed(photo, smap.scores, smap.kept, scale)
    picture = Image.new("RGB", (2 * heat.width + GAP, heat.height), (255, 255, 255))
    picture.paste(heat, (0, 0))
    picture.paste(dimmed, (heat.width + GAP, 0))
    _label(picture, title or f"shift at block {smap.block}", (6, 6))
    _label(picture, smap.kept_text, (heat.width + GAP + 6, 6))
    return picture


def _draw_lines(photo: Image.Image, lmap: LineMap, scale: int, title: str) -> Image.Image:
    kept = lmap.kept_rows[:, None] & lmap.kept_cols[None, :]
    _, heat, dimmed = _heat_and_dimmed(photo, lmap.positions, kept, scale)
    width, height = heat.size
    row_strip = colormap(_normalise(lmap.rows))[:, None] * np.where(lmap.kept_rows, 1.0, 0.35)[:, None, None]
    col_strip = colormap(_normalise(lmap.cols))[None, :] * np.where(lmap.kept_cols, 1.0, 0.35)[None, :, None]
    picture = Image.new("RGB", (2 * width + STRIP + GAP, height + STRIP), (255, 255, 255))
    picture.paste(heat, (0, 0))
    picture.paste(_cells(row_strip.astype(np.uint8), (STRIP, height)), (width, 0))
    picture.paste(_cells(col_strip.astype(np.uint8), (width, STRIP)), (0, height))
    picture.paste(dimmed, (width + STRIP + GAP, 0))
    _label(picture, title or f"line shift at block {lmap.block}", (6, 6))
    _label(picture, lmap.kept_text, (width + STRIP + GAP + 6, 6))
    return picture


def _draw_text(tmap: TextMap, title: str) -> Image.Image:
    norm = _normalise(tmap.scores)
    colours = colormap(norm)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes, x, y, line_height = [], PAD, 2 * PAD + 14, 22
    for word in tmap.words:
        width = probe.textlength(word) + 2 * PAD
        if x + width > ROW_WIDTH - PAD and x > PAD:
            x, y = PAD, y + line_height + PAD
        boxes.append((x, y, x + width, y + line_height))
        x += width + PAD
    picture = Image.new("RGB", (ROW_WIDTH, y + line_height + PAD), (255, 255, 255))
    pen = ImageDraw.Draw(picture)
    pen.text((PAD, PAD), title or f"shift at block {tmap.block}; {tmap.kept_text}", fill=(0, 0, 0))
    for word, box, colour, kept, value in zip(tmap.words, boxes, colours, tmap.kept, norm):
        pen.rectangle(box, fill=tuple(int(c) for c in colour) if kept else (200, 200, 200))
        ink = (0, 0, 0) if (not kept or value > 0.6) else (255, 255, 255)
        pen.text((box[0] + PAD, box[1] + 5), word, fill=ink)
        if not kept:
            middle = (box[1] + box[3]) // 2
            pen.line((box[0] + 2, middle, box[2] - 2, middle), fill=(90, 90, 90), width=1)
    return picture
