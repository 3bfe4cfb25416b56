"""Batch inference with a compressed model on Ray Data: each worker compresses once, writes Parquet.

    python examples/ray_batch_inference.py --limit 2000 --eager         # Fashion-MNIST, a local Ray, 2 CPUs
    python examples/ray_batch_inference.py --data folder:photos/ --model timm:deit_tiny_patch16_224
    python examples/ray_batch_inference.py --config tuned.json --checkpoint results/fmnist_vit.pt

Ray Data shares the sample indices out in batches to a pool of actors (`map_batches` with the
callable class `CompressedPredictor`). Each actor builds the model from its spec and compresses
it once in `__init__` from the job's config (a `Config` dict, or the `config` of a tuned JSON):
no model, compiled or not, is pickled. It reads its own images, and writes each batch's
outputs, with the sample index as a column, to OUT/part-<first index>.parquet. An image that
cannot be read, or a batch that fails, stops the run with an error that names the sample indices.

On a cluster: the same script, with `--address auto` on a node of the cluster, or
`RAY_ADDRESS=ray://head:10001 python examples/ray_batch_inference.py --workers 16 ...`, or as a job:
`ray job submit --address http://head:8265 --working-dir examples -- python ray_batch_inference.py ...`.
`ray.init(address=...)` then connects instead of starting Ray here; this folder is shipped to the
workers (`runtime_env` working_dir). The data folder, the checkpoint and --out must be paths every
node sees (shared storage); Fashion-MNIST must be installed on every node.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import numpy as np
import ray
from tqdm import tqdm

# shared with torchrun_inference.py, next to it (a script's own folder is importable; pytest adds examples/)
from _inference_common import Images, Job, Predictor, add_job_arguments, job_from_args, write_part

log = logging.getLogger("ray_batch_inference")
EXAMPLES = Path(__file__).resolve().parent


class CompressedPredictor:
    """The callable class Ray Data runs in each actor: compress once, then one call per batch."""

    def __init__(self, job: Job, out: str):
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # an actor is a fresh process
        self.predictor = Predictor(job)
        self.out = Path(out)

    def __call__(self, batch: dict) -> dict:
        indices = batch["index"]
        table = self.predictor(indices)
        write_part(table, self.out / f"part-{indices[0]:09d}.parquet")
        # only a summary goes back to the driver: the outputs stay in the workers' Parquet
        return {"samples": np.array([len(indices)])}


def start_ray(address: str | None, num_cpus: int) -> float:
    """Connect to the cluster at `address` (or RAY_ADDRESS), else start Ray here; the seconds it took."""
    started = time.perf_counter()
    if not ray.is_initialized():
        local = address is None and not os.environ.get("RAY_ADDRESS")
        ray.init(address=address, num_cpus=num_cpus if local else None, include_dashboard=False,
                 logging_level=logging.WARNING, runtime_env={"working_dir": str(EXAMPLES),
                                                              "excludes": ["__pycache__"]})
    ray.data.DataContext.get_current().enable_progress_bars = False  # tqdm below counts samples instead
    return time.perf_counter() - started


def sample_indices(count: int, batch: int) -> ray.data.Dataset:
    """The sample indices, in about one block per batch, made here in the driver: a read task
    (ray.data.range) would wait for a CPU that the actors, one per CPU, never free."""
    return ray.data.from_items([{"index": i} for i in range(count)], override_num_blocks=-(-count // batch))


def run(job: Job, out: str | Path, workers: int = 2, num_cpus: int = 2, address: str | None = None) -> Path:
    """Run `job` over its data on `workers` Ray actors; returns the folder of Parquet parts."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    count = len(Images(job.data, job.limit))
    began = time.perf_counter()
    init_seconds = start_ray(address, num_cpus)
    log.info("ray.init: %.1f s", init_seconds)
    predictions = sample_indices(count, job.batch).map_batches(
        CompressedPredictor, fn_constructor_kwargs={"job": job, "out": str(out)}, batch_size=job.batch,
        compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1)
    done, first_batch = 0, None
    with tqdm(total=count, desc="samples", unit="img", mininterval=2) as bar:
        for summary in predictions.iter_rows():
            if first_batch is None:
                first_batch = time.perf_counter()
                log.info("start-up: %.1f s from ray.init to the first batch (%.1f s ray.init; the rest: actors "
                         "starting, building, compressing%s the model)", first_batch - began, init_seconds,
                         " and compiling" if job.compile else "")
            done += int(summary["samples"])
            bar.update(int(summary["samples"]))
    seconds = time.perf_counter() - (first_batch or began)
    log.info("%d samples on %d workers: %.1f s after the first batch (%.0f samples/s), %.1f s in all -> %s", done,
             workers, seconds, done / max(seconds, 1e-9), time.perf_counter() - began, out)
    if done != count:
        raise RuntimeError(f"{done} samples written, {count} expected")
    return out


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(parser)
    parser.add_argument("--workers", type=int, default=2, help="actors, one CPU each")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray (ignored on a cluster)")
    parser.add_argument("--address", help="a running Ray cluster (or set RAY_ADDRESS); default: start one here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        return run(job_from_args(args), args.out, args.workers, args.num_cpus, args.address)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
