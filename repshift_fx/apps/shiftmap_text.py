"""Shift maps of text models: the shift of every word piece at one block, and what is kept.

    gm, values = shiftmap.rewritten_values(model, (input_ids, attention_mask), block=1, keep=0.7)
    tmap = text_map(gm, values, tokenizer, input_ids, block=1)
    print(tmap.line())                      # "[CLS] 0.41 | a 0.12 x | dog 0.93 | ..."  (x: dropped)
    render_text(tmap).save("words.png")     # one box per word piece, coloured by its shift

Padding is left out; prefix tokens, which are never dropped, are shown as kept.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from repshift_fx.apps.shiftmap import colormap
from repshift_fx.errors import RepShiftError

PAD, ROW_WIDTH = 6, 720


@dataclass
class TextShiftMap:
    words: list[str]  # the word pieces of the first text, padding left out
    scores: np.ndarray  # (n,) the shift of each
    kept: np.ndarray  # (n,) bool
    block: int

    def line(self) -> str:
        return " | ".join(f"{w} {s:.3g}{'' if k else ' x'}" for w, s, k in zip(self.words, self.scores, self.kept))


def text_map(gm, values: dict, tokenizer, input_ids: torch.Tensor, block: int,
             attention_mask: torch.Tensor | None = None) -> TextShiftMap:
    """The TextShiftMap of `block` of the first text, from `shiftmap.rewritten_values`."""
    if f"repshift_score_{block}" not in values:
        raise RepShiftError(f"block {block} scores no tokens in this model; choose one of the blocks "
                            "`repshift-fx inspect` lists")
    scores, index = values[f"repshift_score_{block}"][0], values[f"repshift_index_{block}"][0]
    kept = torch.zeros(scores.shape[0], dtype=torch.bool)
    kept[index] = True
    real = attention_mask[0].bool() if attention_mask is not None else torch.ones_like(kept)
    words = tokenizer.convert_ids_to_tokens(input_ids[0][real].tolist())
    return TextShiftMap(words, scores[real].float().numpy(), kept[real].numpy(), block)


def render_text(tmap: TextShiftMap, title: str = "") -> Image.Image:
    """One box per word piece, filled by its shift (inferno, scaled to the text's range); dropped
    pieces are drawn grey with a strike-through. Width ROW_WIDTH, as many rows as needed."""
    low, high = float(tmap.scores.min()), float(tmap.scores.max())
    norm = (tmap.scores - low) / (high - low) if high > low else np.zeros_like(tmap.scores)
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
    draw = ImageDraw.Draw(picture)
    draw.text((PAD, PAD), title or f"shift at block {tmap.block}; kept {int(tmap.kept.sum())} of {len(tmap.words)}",
              fill=(0, 0, 0))
    for word, box, colour, kept, value in zip(tmap.words, boxes, colours, tmap.kept, norm):
        fill = tuple(int(c) for c in colour) if kept else (200, 200, 200)
        draw.rectangle(box, fill=fill)
        ink = (0, 0, 0) if (not kept or value > 0.6) else (255, 255, 255)
        draw.text((box[0] + PAD, box[1] + 5), word, fill=ink)
        if not kept:
            middle = (box[1] + box[3]) // 2
            draw.line((box[0] + 2, middle, box[2] - 2, middle), fill=(90, 90, 90), width=1)
    return picture
