"""What a model spec gives the command: the loaded model and how to feed it, and the spec error.
(specs.py builds timm, torchvision and factory specs; hf_specs.py the hf: ones.)"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from repshift_fx.errors import RepShiftError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SpecError(RepShiftError):
    """A model spec, checkpoint, --input, --kwargs or image the command cannot use."""


@dataclass
class LoadedModel:
    spec: str
    model: nn.Module
    input_shape: tuple[int, ...]  # (B, C, H, W) for images
    mean: tuple[float, ...]
    std: tuple[float, ...]
    tokenizer: object = None  # text models (hf: specs): input_shape is (batch,), the text sets the tokens
    max_length: int | None = None
