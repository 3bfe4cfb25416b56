"""The distances the shift is measured with, written once for tokens and lines."""
from __future__ import annotations

import torch
import torch.nn.functional as F

DISTANCES = ("l2", "l1", "cosine")


def channel_distance(changed: torch.Tensor, reference: torch.Tensor, distance: str, dim: int) -> torch.Tensor:
    """D(changed, reference) over the channel axis `dim` (removed): "l2", "l1" or "cosine" (1 - cos)."""
    if distance == "l2":
        return torch.linalg.vector_norm(changed - reference, ord=2, dim=dim)
    if distance == "l1":
        return torch.linalg.vector_norm(changed - reference, ord=1, dim=dim)
    if distance == "cosine":
        return 1.0 - F.cosine_similarity(changed, reference, dim=dim)
    raise ValueError(f"unknown distance {distance!r}")
