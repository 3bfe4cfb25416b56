"""What examples/ray_batch_inference.py and examples/torchrun_inference.py share: the job a worker is
given (plain values that pickle, never a module), the model each worker builds and compresses once,
the images read by sample index, and the Parquet parts the workers write.

    job = Job(data="fashion-mnist", limit=300, config={"keep": 0.7}, compile=False)
    predictor = Predictor(job)                 # builds and compresses the model here, once
    table = predictor([0, 1, 2])               # pyarrow Table: index, label, prediction, output
    outputs = read_outputs("out/")             # every part, sorted by index
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import repshift_fx  # before timm: installs the torchvision guard
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from repshift_fx.apps.data.datasets import fashion_mnist, to_model_input
from repshift_fx.apps.specs import load_checkpoint, load_model

log = logging.getLogger("inference")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
# tools/train_fmnist_vit.py's ViT: 28 x 28 grey images, 4 x 4 patches (49 tokens + CLS), 8 blocks
FMNIST_VIT = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=8, num_heads=3,
                  class_token=True, global_pool="token")
FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)


class InferenceError(RuntimeError):
    """A sample or a batch that could not be run; the message names the sample indices."""


@dataclass(frozen=True)
class Job:
    """Everything a worker needs to build its compressed model and read its samples."""

    data: str = "fashion-mnist"  # "fashion-mnist", "fashion-mnist:train" or "folder:PATH" (PATH seen by every worker)
    limit: int | None = None  # the first `limit` samples
    model: str = "fmnist-vit"  # or a repshift-fx model spec: timm:NAME, torchvision:NAME, module.path:factory
    model_kwargs: dict = field(default_factory=dict)
    checkpoint: str | None = None  # a state dict every worker can read (e.g. results/fmnist_vit.pt)
    seed: int = 0  # random weights: the same seed gives every worker the same model
    config: dict = field(default_factory=dict)  # repshift_fx.compress options, e.g. Calibration.load(p).config
    compile: bool = True  # False: the eager GraphModule (no Inductor compile in each worker)
    batch: int = 64
    outputs: str = "logits"  # or "embeddings" (the features before the head)


class Images:
    """Images by sample index from Fashion-MNIST (Debian's dataset-fashion-mnist) or a folder."""

    def __init__(self, data: str, limit: int | None = None):
        if data.startswith("folder:"):
            root = Path(data[len("folder:"):])
            files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
            if not files:
                raise InferenceError(f"{str(root)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            classes = sorted({p.relative_to(root).parts[0] for p in files if p.parent != root})
            self.names = [str(p.relative_to(root)) for p in files]
            self.labels = np.array([classes.index(p.relative_to(root).parts[0]) if p.parent != root else -1
                                    for p in files])  # the class sub-folder, -1 for a file at the top
            self._load = lambda i: _read_image(files[i])
        else:
            name, _, split = data.partition(":")
            if name != "fashion-mnist":
                raise InferenceError(f"unknown data {data!r}: give fashion-mnist[:test|:train] or folder:PATH")
            dataset = fashion_mnist(split or "test", limit)
            self.names = [f"{dataset.name}[{i}]" for i in range(len(dataset))]
            self.labels = dataset.labels.numpy()
            self._load = dataset.load

    def __len__(self) -> int:
        return len(self.names)

    def load(self, index: int) -> np.ndarray:
        try:
            return self._load(index)
        except Exception as error:
            raise InferenceError(f"sample {index} ({self.names[index]}) cannot be read: "
                                 f"{type(error).__name__}: {error}") from error


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


class Embeddings(torch.nn.Module):
    """A timm model's pooled features before its head (what `outputs="embeddings"` writes)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


def build_model(job: Job) -> tuple[torch.nn.Module, tuple[int, ...], tuple, tuple]:
    """(model in eval mode, input shape (C, H, W), mean, std), the same in every process for one job."""
    torch.manual_seed(job.seed)
    if job.model == "fmnist-vit":
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(**{**FMNIST_VIT, **job.model_kwargs}).eval()
        if job.checkpoint:
            load_checkpoint(model, job.checkpoint, "fmnist-vit")
        shape, mean, std = (1, *model.patch_embed.img_size), FMNIST_MEAN, FMNIST_STD
    else:
        loaded = load_model(job.model, checkpoint=job.checkpoint, kwargs=job.model_kwargs)
        model, shape, mean, std = loaded.model, loaded.input_shape[1:], loaded.mean, loaded.std
    if job.outputs == "embeddings":
        model = Embeddings(model).eval()
    return model, tuple(shape), mean, std


def compress_model(job: Job) -> tuple[torch.nn.Module, tuple[int, ...], tuple, tuple]:
    """build_model's model, compressed once for inputs of `job.batch` samples (and compiled, with
    job.compile: torch.compile is lazy, so one call here moves Inductor's work into the start-up)."""
    model, shape, mean, std = build_model(job)
    example = torch.randn((job.batch, *shape), generator=torch.Generator().manual_seed(job.seed))
    compressed = repshift_fx.compress(model, example, compile=job.compile, **job.config)
    if job.compile:
        with torch.no_grad():
            compressed(example)
    return compressed, shape, mean, std


class Predictor:
    """One worker's compressed model and image reader: sample indices in, a pyarrow Table out."""

    def __init__(self, job: Job):
        started = time.perf_counter()
        self.job = job
        self.images = Images(job.data, job.limit)
        self.model, self.shape, self.mean, self.std = compress_model(job)
        log.info("pid %d: model built and compressed%s in %.1f s", os.getpid(),
                 " and compiled" if job.compile else "", time.perf_counter() - started)

    def __call__(self, indices) -> pa.Table:
        indices = np.asarray(indices, dtype=np.int64)
        pixels = [self.images.load(int(i)) for i in indices]  # an unreadable image names its own index
        try:
            outputs = self.forward(to_model_input(pixels, self.shape, self.mean, self.std))
        except Exception as error:
            raise InferenceError(f"the batch of samples {describe(indices)} failed: {type(error).__name__}: "
                                 f"{error}") from error
        return to_table(indices, self.images.labels[indices], outputs, self.job.outputs == "logits")

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> np.ndarray:
        # a short last batch is padded to job.batch, so a compiled model sees one shape and compiles once
        count = len(x)
        if count < self.job.batch:
            x = torch.cat([x, x[-1:].expand(self.job.batch - count, *x.shape[1:])])
        return self.model(x)[:count].float().numpy()


def describe(indices: np.ndarray) -> str:
    """'3, 4, 5' or '0 to 63 (64 samples)'."""
    if len(indices) <= 8:
        return ", ".join(map(str, indices))
    return f"{indices.min()} to {indices.max()} ({len(indices)} samples)"


def to_table(indices: np.ndarray, labels: np.ndarray, outputs: np.ndarray, logits: bool) -> pa.Table:
    columns = {"index": pa.array(indices, pa.int64()), "label": pa.array(labels, pa.int64())}
    if logits:
        columns["prediction"] = pa.array(outputs.argmax(1), pa.int64())
    flat = pa.array(outputs.astype(np.float32).reshape(-1))
    columns["output"] = pa.FixedSizeListArray.from_arrays(flat, outputs.shape[1])
    return pa.table(columns)


def write_part(table: pa.Table, path: Path) -> Path:
    """Write atomically: a crashed or retried worker leaves no half-written part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    pq.write_table(table, partial)
    os.replace(partial, path)
    return path


def read_outputs(folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(indices, outputs) from every part in `folder`, sorted by index."""
    table = pq.read_table(sorted(Path(folder).glob("*.parquet"))).sort_by("index")
    return table["index"].to_numpy(), np.stack(table["output"].to_numpy(zero_copy_only=False))


# --- the command line both scripts take ---


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="fashion-mnist", help="fashion-mnist[:test|:train] or folder:PATH")
    parser.add_argument("--limit", type=int, help="the first N samples")
    parser.add_argument("--model", default="fmnist-vit", help="fmnist-vit (default), or timm:NAME, torchvision:NAME")
    parser.add_argument("--kwargs", default="{}", help="JSON keyword arguments for the model, e.g. '{\"depth\": 4}'")
    parser.add_argument("--checkpoint", help="a state dict every worker can read, e.g. results/fmnist_vit.pt")
    parser.add_argument("--config", help="compress options: a tuned JSON (repshift-fx tune) or a JSON object")
    parser.add_argument("--keep", type=float, help="shorthand for the config's keep")
    parser.add_argument("--eager", action="store_true", help="skip torch.compile in the workers")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--outputs", choices=("logits", "embeddings"), default="logits")
    parser.add_argument("--out", default="predictions", help="a folder for the Parquet parts")


def job_from_args(args: argparse.Namespace) -> Job:
    """The job, with paths made absolute (workers may run elsewhere) and the config checked here."""
    config = load_config(args.config)
    if args.keep is not None:
        config["keep"] = args.keep
    repshift_fx.Config.from_kwargs(**config)  # a bad option fails now, not in every worker
    data = f"folder:{Path(args.data[7:]).resolve()}" if args.data.startswith("folder:") else args.data
    return Job(data=data, limit=args.limit, model=args.model, model_kwargs=json.loads(args.kwargs),
               checkpoint=str(Path(args.checkpoint).resolve()) if args.checkpoint else None, config=config,
               compile=not args.eager, batch=args.batch, outputs=args.outputs)


def load_config(source: str | None) -> dict:
    """compress options from a calibration file (Calibration.save / repshift-fx tune), a JSON file
    holding an object of options, or that object inline."""
    if not source:
        return {}
    if not source.lstrip().startswith("{"):
        record = json.loads(Path(source).read_text())
        if "format" in record:
            return dict(repshift_fx.Calibration.load(source).config)
        return record
    return json.loads(source)
