"""Line-wise Representation Shift for CNNs, as plain functions the line pass inserts into the graph.

    rows, cols = line_shift(changed, reference)              # (B, H), (B, W)
    index      = select_grid((rows, cols), keep_rows, keep_cols)  # ((B, h), (B, w)), int64
    grid       = gather_lines(x, index)                      # (B, C, h, w)

A convolution needs a full 2D grid, so whole rows and columns of a (B, C, H, W) feature map are
dropped. Each position is scored by D(block(x), shortcut(x)) over channels; a row's score is the
mean of its positions' scores, a column's likewise. Every sample keeps the same number of rows
and columns (shapes stay static), each sample its own best ones, in their original order.
"""
from __future__ import annotations

import torch

from repshift_fx.method.distance import channel_distance

Lines = tuple[torch.Tensor, torch.Tensor]  # (rows (B, H), cols (B, W)): scores, or kept indices


def position_shift(changed: torch.Tensor, reference: torch.Tensor, distance: str = "l2") -> torch.Tensor:
    """D(changed, reference) at every position, over channels: (B, C, H, W) x 2 -> (B, H, W)."""
    return channel_distance(changed, reference, distance, dim=1)


def line_means(positions: torch.Tensor) -> Lines:
    """Row and column means of a score map: (B, H, W) -> ((B, H), (B, W))."""
    return positions.mean(dim=2), positions.mean(dim=1)


def line_shift(changed: torch.Tensor, reference: torch.Tensor, distance: str = "l2") -> Lines:
    """Row and column scores by Representation Shift: (B, C, H, W) x 2 -> ((B, H), (B, W))."""
    return line_means(position_shift(changed, reference, distance))


def line_norm(grid: torch.Tensor) -> Lines:
    """Baseline: the mean L2 norm (over channels) of each row and column. (B, C, H, W) -> ((B, H), (B, W))."""
    return line_means(torch.linalg.vector_norm(grid, ord=2, dim=1))


def random_lines(grid: torch.Tensor) -> Lines:
    """Baseline: uniform noise per row and per column, a fresh draw per call. -> ((B, H), (B, W))."""
    batch, _, height, width = grid.shape
    return (torch.rand(batch, height, device=grid.device, dtype=grid.dtype),
            torch.rand(batch, width, device=grid.device, dtype=grid.dtype))


def select_lines(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` best-scored lines, in their original order: (B, L) -> (B, keep), int64."""
    best = scores.topk(keep, dim=1, sorted=False).indices
    return best.sort(dim=1).values


def select_grid(scores: Lines, keep_rows: int, keep_cols: int) -> Lines:
    """Rows and columns kept: ((B, H), (B, W)) -> ((B, keep_rows), (B, keep_cols))."""
    rows, cols = scores
    return select_lines(rows, keep_rows), select_lines(cols, keep_cols)


def gather_lines(grid: torch.Tensor, index: Lines) -> torch.Tensor:
    """The rows and columns at `index`, per sample: (B, C, H, W), ((B, h), (B, w)) -> (B, C, h, w).

    The result keeps the grid's memory format: a channels-last grid is gathered as (B, H, W, C),
    so that the convolutions after it stay in the (much faster on CPU) channels-last kernels."""
    rows, cols = index
    if grid.dim() == 4 and grid.is_contiguous(memory_format=torch.channels_last) and not grid.is_contiguous():
        nhwc = grid.permute(0, 2, 3, 1)  # a view: (B, H, W, C), contiguous
        channels, width = nhwc.shape[3], nhwc.shape[2]
        nhwc = nhwc.gather(1, rows[:, :, None, None].expand(-1, -1, width, channels))
        nhwc = nhwc.gather(2, cols[:, None, :, None].expand(-1, rows.shape[1], -1, channels))
        return nhwc.permute(0, 3, 1, 2)
    channels, width = grid.shape[1], grid.shape[3]
    grid = grid.gather(2, rows[:, None, :, None].expand(-1, channels, -1, width))
    return grid.gather(3, cols[:, None, None, :].expand(-1, channels, rows.shape[1], -1))
