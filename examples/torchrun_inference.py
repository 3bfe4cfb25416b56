"""Batch inference with a compressed model under torch.distributed: each rank compresses once,
runs its shard of the data, and writes its own Parquet part.

    torchrun --nproc_per_node 2 examples/torchrun_inference.py --limit 2000 --eager     # 2 CPU processes, gloo
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv-endpoint head:29500 examples/torchrun_inference.py ...

The same job options as examples/ray_batch_inference.py (--data, --model, --config tuned.json, ...).
A `DistributedSampler` (no shuffling) gives rank r the samples r, r + W, r + 2W, ... of W ranks;
rank r writes OUT/part-rank<r>.parquet, each row with its sample index. The gloo process group
only adds up the counts at the end, so rank 0 can check that every sample was written once.
On several nodes, the data, the checkpoint and --out must be paths every node sees.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler
from tqdm import tqdm

# shared with ray_batch_inference.py, next to it (a script's own folder is importable; pytest adds examples/)
from _inference_common import Job, Predictor, add_job_arguments, job_from_args

log = logging.getLogger("torchrun_inference")


def shard(count: int, rank: int, world: int) -> list[int]:
    """This rank's sample indices. DistributedSampler pads the shards to equal length by repeating
    samples; the repeats are cut, so that no sample is written twice."""
    indices = list(DistributedSampler(range(count), num_replicas=world, rank=rank, shuffle=False))
    return indices[:len(range(rank, count, world))]


def run_rank(job: Job, out: Path, rank: int, world: int) -> tuple[int, float]:
    """Compress once, run this rank's shard in batches, write OUT/part-rank<r>.parquet; the samples
    written, and the seconds from the end of the first batch to the end."""
    began = time.perf_counter()
    predictor = Predictor(job)
    indices = shard(len(predictor.images), rank, world)
    path = out / f"part-rank{rank:05d}.parquet"
    partial = path.with_name(path.name + ".partial")  # renamed when complete: a failed rank leaves no part
    writer, first_batch = None, time.perf_counter()
    with tqdm(total=len(indices), desc=f"rank {rank}", unit="img", mininterval=2, disable=rank != 0) as bar:
        for start in range(0, len(indices), job.batch):
            table = predictor(indices[start:start + job.batch])
            if writer is None:
                first_batch = time.perf_counter()
                log.info("rank %d: start-up %.1f s to the first batch (building, compressing%s the model)",
                         rank, first_batch - began, " and compiling" if job.compile else "")
                writer = pq.ParquetWriter(partial, table.schema)
            writer.write_table(table)
            bar.update(table.num_rows)
    if writer is not None:
        writer.close()
        partial.replace(path)
    return len(indices), time.perf_counter() - first_batch


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    job = job_from_args(args)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE and MASTER_ADDR
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        began = time.perf_counter()
        count, seconds = run_rank(job, out, rank, world)
        written, slowest = torch.tensor([count]), torch.tensor([seconds])
        dist.all_reduce(written)  # also waits for every rank to finish
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        if rank == 0:
            log.info("%d samples on %d ranks: %.1f s after the first batch (%.0f samples/s), %.1f s in all -> %s",
                     written.item(), world, slowest.item(), written.item() / max(slowest.item(), 1e-9),
                     time.perf_counter() - began, out)
        dist.barrier()  # no rank tears the group down while another is still in a collective (gloo may abort)
    finally:
        dist.destroy_process_group()
    return out


if __name__ == "__main__":
    main()
