"""Shift maps of lines mode: the row and column scores of one CNN block, drawn over the image.

    lmap = line_shift_map(model, x, block=4, keep=0.7)     # positions (H, W), rows (H,), cols (W,)
    picture = render_lines(photo, lmap, scale=2)           # PIL image
    picture.save("lines.png")

The scores are read from the rewritten graph (`compress(..., mode="lines", compile=False)` run
by a `torch.fx.Interpreter` that keeps every value): `repshift_score_{block}` (rows (B, H),
cols (B, W)) and `repshift_index_{block}` (kept rows, kept cols); the per-position shift is
recomputed from the scoring node's inputs (block output, shortcut).

The picture: the position shift as a heat map over the photo, with a strip of the row scores on
its right and of the column scores below it (kept lines bright, dropped ones dark), and beside
it the photo with the dropped rows and columns dimmed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.fx
from PIL import Image, ImageDraw

from repshift_fx.method import lines
from repshift_fx.apps.shiftmap import colormap, rewritten_values

GAP, STRIP = 8, 14


@dataclass
class LineShiftMap:
    positions: np.ndarray  # (H, W): D(block(x), shortcut(x)) at each position of the block's grid
    rows: np.ndarray  # (H,): mean over each row
    cols: np.ndarray  # (W,): mean over each column
    kept_rows: np.ndarray  # (H,) bool
    kept_cols: np.ndarray  # (W,) bool
    block: int

    @property
    def kept_text(self) -> str:
        """'kept R of H rows, C of W columns': the caption of `render_lines` and the CLI's line."""
        return (f"kept {int(self.kept_rows.sum())} of {self.rows.size} rows, "
                f"{int(self.kept_cols.sum())} of {self.cols.size} columns")


def line_shift_map(model: torch.nn.Module, x: torch.Tensor, block: int, *, keep=0.7, **config) -> LineShiftMap:
    """The row and column shift at `block` for the first image of x (B, C, H, W)."""
    gm, values = rewritten_values(model, x, block, keep=keep, mode="lines", **config)
    return line_map(gm, values, block, config.get("distance", "l2"))


def line_map(gm: torch.fx.GraphModule, values: dict, block: int, distance: str = "l2") -> LineShiftMap:
    """The LineShiftMap of `block` from the values of a rewritten graph (`rewritten_values`)."""
    score = next(n for n in gm.graph.nodes if n.name == f"repshift_score_{block}")
    (rows, cols), (kept_r, kept_c) = values[score.name], values[f"repshift_index_{block}"]
    inputs = [values[a.name] for a in score.args]
    positions = lines.position_shift(*inputs, distance) if len(inputs) == 2 else None
    kept_rows = torch.zeros(rows.shape[1], dtype=torch.bool)
    kept_cols = torch.zeros(cols.shape[1], dtype=torch.bool)
    kept_rows[kept_r[0]], kept_cols[kept_c[0]] = True, True
    grid = positions[0] if positions is not None else rows[0][:, None] + cols[0][None, :]
    return LineShiftMap(grid.float().numpy(), rows[0].float().numpy(), cols[0].float().numpy(), kept_rows.numpy(),
                        kept_cols.numpy(), block)


def _normalise(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def _cells(image: np.ndarray, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(image).resize(size, Image.Resampling.NEAREST)


def render_lines(photo: Image.Image, lmap: LineShiftMap, scale: int = 2, title: str = "") -> Image.Image:
    """Heat map + row/column strips | the photo with dropped lines dimmed.

    Size: (2 * W * scale + STRIP + GAP) x (H * scale + STRIP) for a W x H photo."""
    size = (photo.width * scale, photo.height * scale)
    base = photo.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    heat = Image.blend(base, _cells(colormap(_normalise(lmap.positions)), size), alpha=0.6)
    dim = np.where(lmap.kept_rows[:, None] & lmap.kept_cols[None, :], 1.0, 0.3)
    row_strip = colormap(_normalise(lmap.rows))[:, None] * np.where(lmap.kept_rows, 1.0, 0.35)[:, None, None]
    col_strip = colormap(_normalise(lmap.cols))[None, :] * np.where(lmap.kept_cols, 1.0, 0.35)[None, :, None]
    shade = _cells((dim * 255).astype(np.uint8), size)
    dimmed = Image.composite(base, Image.blend(base, Image.new("RGB", size, (20, 20, 40)), 0.75), shade)
    picture = Image.new("RGB", (2 * size[0] + STRIP + GAP, size[1] + STRIP), (255, 255, 255))
    picture.paste(heat, (0, 0))
    picture.paste(_cells(row_strip.astype(np.uint8), (STRIP, size[1])), (size[0], 0))
    picture.paste(_cells(col_strip.astype(np.uint8), (size[0], STRIP)), (0, size[1]))
    picture.paste(dimmed, (size[0] + STRIP + GAP, 0))
    draw = ImageDraw.Draw(picture)
    kept = lmap.kept_text
    for text, at in ((title or f"line shift at block {lmap.block}", (6, 6)), (kept, (size[0] + STRIP + GAP + 6, 6))):
        box = draw.textbbox(at, text)
        draw.rectangle((box[0] - 3, box[1] - 3, box[2] + 3, box[3] + 3), fill=(0, 0, 0))
        draw.text(at, text, fill=(255, 255, 255))
    return picture
