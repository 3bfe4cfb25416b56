"""What running a training-mode model leaves behind, kept from the user.

    with untouched(model):                     # its buffers and the random generators as they were after it
        ...                                    # the pass runs the model and its graph several times
    with seeded(args):                         # the same random draws for two runs to be compared
        ...

A model in training mode draws random numbers (dropout, drop-path) and updates statistics in place
(BatchNorm's running mean and variance) each time it runs. compress(train=True) runs the model and
its graph to check the capture and to read shapes: those runs must not move the user's random
streams nor count as training batches for the statistics, and the two runs compared in a check must
draw the same numbers.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def _cuda_devices(tensors) -> list[int]:
    return sorted({t.device.index or 0 for t in tensors if isinstance(t, torch.Tensor) and t.is_cuda})


@contextlib.contextmanager
def untouched(owner):
    """The buffers of `owner` (a module, or a list of tensors) hold their values again after the
    block, and the random generators (CPU and the buffers' CUDA devices) their states. Only a buffer
    that changed is written back (an inference tensor may not be written outside inference mode)."""
    buffers = list(owner.buffers()) if isinstance(owner, nn.Module) else [t for t in owner if isinstance(t, torch.Tensor)]
    saved = [b.detach().clone() for b in buffers]
    with torch.random.fork_rng(devices=_cuda_devices(buffers)):
        try:
            yield
        finally:
            with torch.no_grad():
                for buffer, value in zip(buffers, saved):
                    if not torch.equal(buffer, value):
                        buffer.copy_(value)


@contextlib.contextmanager
def seeded(args, seed: int = 0):
    """Inside the block the random generators start from `seed` (those of the CUDA devices of
    `args` too); after it they are as before."""
    with torch.random.fork_rng(devices=_cuda_devices(args)):
        torch.manual_seed(seed)
        yield
