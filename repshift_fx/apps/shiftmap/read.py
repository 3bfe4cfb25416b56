"""Reading shift maps from the rewritten graph, in either mode (and for text).

    gm, values = rewritten_values(model, x, block, keep=0.7)   # the graph and every value it computed
    smap = read_map(gm, values, block, x)                      # TokenMap, LineMap or TextMap

The scores are the graph's own: `compress(..., at=(block,), compile=False)` run by a
`torch.fx.Interpreter` that keeps every value. `repshift_score_{block}` holds the scores ((B, N)
per token; rows (B, H) and cols (B, W) per line) and `repshift_index_{block}` what was kept.
Prefix tokens (CLS, registers) are left out of image maps; padding out of text maps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.fx
from PIL import Image, ImageOps, UnidentifiedImageError

from repshift_fx.api import compress
from repshift_fx.apps.specs import SpecError
from repshift_fx.errors import RepShiftError
from repshift_fx.method import lines


@dataclass
class TokenMap:
    """Tokens mode, an image model: the patch tokens on the image's grid."""

    scores: np.ndarray  # (h, w) float: the shift of each patch token
    kept: np.ndarray  # (h, w) bool: kept at the chosen rate
    block: int
    prefix: int  # prefix tokens left out of the map
    keep: int  # patch tokens kept

    @property
    def tokens(self) -> int:
        return self.scores.size

    @property
    def kept_text(self) -> str:
        return f"kept {self.keep} of {self.tokens} patch tokens"


@dataclass
class LineMap:
    """Lines mode, a CNN: the shift at every position of one block's grid, and its rows and columns."""

    positions: np.ndarray  # (H, W): D(block(x), shortcut(x)) at each position of the block's grid
    rows: np.ndarray  # (H,): mean over each row
    cols: np.ndarray  # (W,): mean over each column
    kept_rows: np.ndarray  # (H,) bool
    kept_cols: np.ndarray  # (W,) bool
    block: int

    @property
    def kept_text(self) -> str:
        return (f"kept {int(self.kept_rows.sum())} of {self.rows.size} rows, "
                f"{int(self.kept_cols.sum())} of {self.cols.size} columns")


@dataclass
class TextMap:
    """Tokens mode, a text model: the word pieces of the first text, padding left out."""

    words: list[str]
    scores: np.ndarray  # (n,) the shift of each
    kept: np.ndarray  # (n,) bool
    block: int

    @property
    def kept_text(self) -> str:
        return f"kept {int(self.kept.sum())} of {len(self.words)} word pieces"

    def line(self) -> str:
        """'[CLS] 0.41 | a 0.12 x | dog 0.93 | ...' (x: dropped)."""
        return " | ".join(f"{w} {s:.3g}{'' if k else ' x'}" for w, s, k in zip(self.words, self.scores, self.kept))


def rewritten_values(model: torch.nn.Module, x, block: int, *, keep=0.7, **config):
    """(the graph `compress(..., at=(block,), compile=False)` rewrites, every value it computes
    on the first sample of x, a tensor or a tuple of them)."""
    args = tuple(t[:1] for t in x) if isinstance(x, tuple) else (x[:1],)
    gm = compress(model, args, keep=keep, at=(block,), compile=False, **config)
    runner = torch.fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        runner.run(*args)
    return gm, {node.name: value for node, value in runner.env.items()}


def shift_map(model: torch.nn.Module, x, block: int, *, keep=0.7, tokenizer=None, **config):
    """The map of `block` for the first sample of x, in the mode the model is pruned in."""
    gm, values = rewritten_values(model, x, block, keep=keep, **config)
    return read_map(gm, values, block, x, tokenizer, config.get("distance", "l2"))


def read_map(gm: torch.fx.GraphModule, values: dict, block: int, x, tokenizer=None, distance: str = "l2"):
    """The map of `block` from `rewritten_values`: a LineMap in lines mode, a TextMap given the
    tokenizer of a text model (x: (input_ids, attention_mask)), else a TokenMap."""
    if f"repshift_score_{block}" not in values:
        raise RepShiftError(f"block {block} scores no tokens in this model; choose one of the blocks "
                            "`repshift-fx inspect` lists")
    if gm.report.mode == "lines":
        return _line_map(gm, values, block, distance)
    if tokenizer is not None:
        return _text_map(values, block, tokenizer, *x)
    return _token_map(gm, values, x, block)


def _kept(index: torch.Tensor, size: int) -> torch.Tensor:
    kept = torch.zeros(size, dtype=torch.bool)
    kept[index] = True
    return kept


def _token_map(gm, values: dict, x: torch.Tensor, block: int) -> TokenMap:
    scores, index = values[f"repshift_score_{block}"][0], values[f"repshift_index_{block}"][0]  # (N,), (P + K,)
    prefix = gm.report.prefix
    kept = _kept(index, scores.shape[0])
    n = scores.shape[0] - prefix
    h, w = grid(n, x.shape[-2], x.shape[-1]) if x.dim() == 4 else (n, 1)
    if x.dim() == 4 and abs(h / w - x.shape[-2] / x.shape[-1]) > 0.5:
        raise RepShiftError(f"block {block} has {n} patch tokens, which do not tile the {x.shape[-2]}x{x.shape[-1]} "
                            "image; shift maps need a model whose tokens are image patches")
    return TokenMap(scores[prefix:].float().reshape(h, w).numpy(), kept[prefix:].reshape(h, w).numpy(), block,
                    prefix, int(index.numel() - prefix))


def _line_map(gm, values: dict, block: int, distance: str) -> LineMap:
    score = next(n for n in gm.graph.nodes if n.name == f"repshift_score_{block}")
    (rows, cols), (kept_r, kept_c) = values[score.name], values[f"repshift_index_{block}"]
    inputs = [values[a.name] for a in score.args]  # (block output, shortcut) when scored by the shift
    positions = lines.position_shift(*inputs, distance) if len(inputs) == 2 else None
    grid_scores = positions[0] if positions is not None else rows[0][:, None] + cols[0][None, :]
    return LineMap(grid_scores.float().numpy(), rows[0].float().numpy(), cols[0].float().numpy(),
                   _kept(kept_r[0], rows.shape[1]).numpy(), _kept(kept_c[0], cols.shape[1]).numpy(), block)


def _text_map(values: dict, block: int, tokenizer, input_ids: torch.Tensor,
              attention_mask: torch.Tensor | None = None) -> TextMap:
    scores, index = values[f"repshift_score_{block}"][0], values[f"repshift_index_{block}"][0]
    kept = _kept(index, scores.shape[0])
    real = attention_mask[0].bool() if attention_mask is not None else torch.ones_like(kept)
    words = tokenizer.convert_ids_to_tokens(input_ids[0][real].tolist())
    return TextMap(words, scores[real].float().numpy(), kept[real].numpy(), block)


def grid(tokens: int, height: int, width: int) -> tuple[int, int]:
    """(h, w) with h * w == tokens and h / w as close as possible to height / width."""
    h = max(1, round(math.sqrt(tokens * height / width)))
    for candidate in sorted(range(1, tokens + 1), key=lambda c: abs(c - h)):
        if tokens % candidate == 0:
            return candidate, tokens // candidate
    return tokens, 1


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
