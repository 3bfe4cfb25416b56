"""repshift_fx: Representation Shift token pruning as a torch.fx graph pass.

    compressed = repshift_fx.compress(model, example_input)          # compiled, pruned
    print(repshift_fx.inspect(model, example_input))                  # what it would do
"""
from __future__ import annotations

from ._torchvision_guard import install as _install_torchvision_guard

_install_torchvision_guard()

import torch  # noqa: E402

from .config import Config  # noqa: E402
from .errors import (  # noqa: E402
    ConfigError,
    ExampleInputError,
    ModelModeError,
    NoSiteError,
    RepShiftError,
    TraceError,
    UnsupportedSiteError,
)
from .flops import per_sample_gmacs  # noqa: E402
from .pipeline import rewrite  # noqa: E402
from .report import Report, build_report  # noqa: E402

__all__ = [
    "compress", "inspect", "Config", "Report", "RepShiftError", "ConfigError", "ExampleInputError",
    "ModelModeError", "NoSiteError", "TraceError", "UnsupportedSiteError",
]
__version__ = "0.1.0"


def _analyse(model, example_input, config: Config, flops: bool):
    gm, ctx = rewrite(model, example_input, config)
    before = after = None
    if flops:
        before = per_sample_gmacs(model, ctx.args)
        after = per_sample_gmacs(gm, ctx.args)
    return gm, build_report(ctx, before, after)


def compress(model: torch.nn.Module, example_input, *, keep=0.7, at=None, site="mlp", distance="l2",
             residual=False, score="shift", protect="auto", sdpa=True, compile=True, **compile_options):
    """Prune `model`'s tokens by Representation Shift and compile it.

    Args:
        model: an nn.Module in eval mode (a ViT-like model: residual attention and MLP blocks
            over (B, N, C) tokens). It is not changed; the result shares its parameters.
        example_input: a tensor (or tuple of tensors) the model accepts; it fixes the token
            counts (another resolution needs another compress()).
        keep: fraction of the non-prefix tokens kept at each drop, in (0, 1], or one per `at`.
            A drop keeps ceil(keep * n) of n tokens, the best-scored, in their original order.
        at: 0-based indices of the blocks whose shift is measured; the tokens are dropped from
            the next block on. None: (d//4, d//2, 3d//4) for d blocks, (3, 6, 9) for DeiT.
        site: "mlp" scores D(MLP(LN(x')), x') at the MLP sub-layer (the paper's default);
            "attn" the same at the attention sub-layer; "block" D(block(x), x).
        distance: "l2", "l1" or "cosine" (1 - cosine similarity), over channels.
        residual: score D(x' + branch(x'), x') instead of D(branch(x'), x').
        score: "shift" (the method), or the baselines "norm" (token L2 norm) and "random".
        protect: "auto" finds the prefix tokens (CLS, distillation, registers) in the graph; an
            int sets their number. They are never dropped.
        sdpa: rewrite explicit softmax attention to F.scaled_dot_product_attention.
        compile: False returns the rewritten torch.fx.GraphModule (eager) for reading and tests.
        **compile_options: passed to torch.compile (mode=, backend=, dynamic=, ...).

    Returns:
        The compiled module (torch.compile of the rewritten graph), or the GraphModule; either
        has `.report`, the `Report` that `inspect` returns.

    Raises:
        RepShiftError: a subclass per cause (bad option, training mode, untraceable model, bad
            example input, no residual MLP, a site that cannot be pruned safely).
    """
    config = Config(keep=keep, at=at, site=site, distance=distance, residual=residual, score=score,
                    protect=protect, sdpa=sdpa)
    gm, report = _analyse(model, example_input, config, flops=False)
    gm.report = report
    if not compile:
        return gm
    return torch.compile(gm, **compile_options)


def inspect(model: torch.nn.Module, example_input, **config) -> Report:
    """What `compress(model, example_input, **config)` would do, without compiling.

    Returns a `Report`: blocks and their module paths, tokens in and out of every block, where
    attention is fused (SDPA, rewritten, MultiheadAttention, kept explicit and why), the prefix
    tokens and the GFLOPs per sample before and after. `print(report)` shows it as a table.
    """
    config.pop("compile", None)
    gm, report = _analyse(model, example_input, Config.from_kwargs(**config), flops=True)
    return report
