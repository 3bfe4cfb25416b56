"""The public entry points: `compress` (rewrite, then torch.compile) and `inspect` (the report only).

    compressed = compress(model, example_input, keep=0.7)
    print(inspect(model, example_input))
"""
from __future__ import annotations

import inspect as pyinspect

import torch

from repshift_fx.capture import as_args, reuse_traces
from repshift_fx.capture.guard import InputGuard
from repshift_fx.config import Config, check_names, option_names
from repshift_fx.errors import UnsupportedSiteError
from repshift_fx.pipeline import run
from repshift_fx.report.refusals import refused_report
from repshift_fx.report.tokens import Report


# torch.compile's own keywords ("mode" is compress()'s: torch.compile's is compile_mode=)
COMPILE_KEYWORDS = tuple(p for p in pyinspect.signature(torch.compile).parameters if p not in ("model", "mode"))


def compress(model: torch.nn.Module, example_input, *, keep=None, at=None, site="mlp", distance="l2",
             residual=False, score="shift", protect="auto", sdpa=True, target_flops=None, mode="auto", fuse=False,
             reduce="drop", restore="auto", r=None, merge_metric="keys", size_attention="mask", shift_guidance=0.0,
             compile=True,
             **compile_options):
    """Prune `model`'s tokens by Representation Shift and compile it.

    Args:
        model: an nn.Module in eval mode (a ViT-like model: residual attention and MLP blocks
            over (B, N, C) tokens). It is not changed; the result shares its parameters.
        example_input: a tensor (or tuple of tensors) the model accepts; it fixes the token
            counts (another resolution needs another compress(): the result called at another
            size than the example's, the batch aside, raises an ExampleInputError).
        keep: fraction of the non-prefix tokens kept at each drop, in (0, 1], or one per `at`.
            A drop keeps ceil(keep * n) of n tokens, the best-scored, in their original order.
            Default 0.7 (unless target_flops is given; the two exclude each other).
        at: 0-based indices of the blocks whose shift is measured; the tokens are dropped from
            the next block on. None: (d//4, d//2, 3d//4) for d blocks, (3, 6, 9) for DeiT.
        site: "mlp" scores D(MLP(LN(x')), x') at the MLP sub-layer (the paper's default);
            "attn" the same at the attention sub-layer; "block" D(block(x), x).
        distance: "l2", "l1" or "cosine" (1 - cosine similarity), over channels.
        residual: score D(x' + branch(x'), x') instead of D(branch(x'), x').
        score: "shift" (the method), or the baselines "norm" (token L2 norm), "random", and
            "attention" (EViT: the CLS token's attention to each token, averaged over heads, in the
            scoring block; without prefix tokens, the mean attention each token receives). It needs
            the attention map, so the scoring blocks (only those) run explicit attention.
        protect: "auto" finds the prefix tokens (CLS, distillation, registers) in the graph; an
            int sets their number. They are never dropped.
        sdpa: rewrite explicit softmax attention to F.scaled_dot_product_attention.
        target_flops: a FLOP budget in (0, 1], compressed / original: the planner chooses the one
            keep rate for every drop in `at` whose FLOPs are the largest at most this fraction
            (counted by torch.utils.flop_counter); `.report.budget` says the ratio reached.
        mode: "auto" picks from the graph: "tokens" for residual MLPs over (B, N, C) tokens (ViTs),
            else "lines" for residual blocks over (B, C, H, W) maps (CNNs: ResNet, EfficientNet),
            which drops whole rows and columns, scored by D(block(x), shortcut(x)) averaged along
            each line; there `keep` may also be a pair (rows, cols), or one rate or pair per `at`,
            and `at` counts the residual adds in the order the stream meets them (docs/lines.md).
        fuse: EViT fusion: the dropped tokens of each drop are folded into one extra token (their
            average weighted by the softmax of their scores), placed after the kept tokens; later
            drops score it like any other token. Tokens mode only.
        reduce: "drop" (the paper), or "merge": each leaving token is added into its most similar
            kept token (cosine of the scoring block's attention keys, `merge_metric="keys"`, or of the
            stream, "stream"), a size-weighted mean; every token carries its size, and later
            attention weighs keys by it (proportional attention, kept fused: an SDPA attn_mask, or
            `size_attention="qk"`, an extra q/k column that needs no mask).
        restore: "auto" (default) puts every token back where the graph needs them all (a
            per-token output such as BertModel's last_hidden_state, a stage that reshapes tokens
            to a grid): a kept token takes its value, a merged one the value of the token it went
            into, a dropped one its value when dropped. True always restores at the end of each
            run of blocks; False refuses such models.
        r: score="tome" (ToMe, the baseline, on any graph): tokens merged away in each block of
            `at` (all blocks by default) by bipartite soft matching between attention and MLP.
        shift_guidance: score="tome": a weight >= 0 on the representation shift inside ToMe's matching.
            ToMe merges the tokens of set A most similar to set B; with a weight w each A token's
            similarity is lowered by w times its shift in the block before, the residual form
            D(x' + MLP(LN(x')), x') at `site` with `distance` (over the mean of A),
            so that of equally redundant tokens those the layers still change stay. 0: ToMe.
        compile: False returns the rewritten torch.fx.GraphModule (eager) for reading and tests.
        **compile_options: passed to torch.compile (backend=, dynamic=, options=, ...);
            torch.compile's own `mode` ("max-autotune", ...) is `compile_mode=` here, since
            `mode` chooses tokens or lines.

    Returns:
        The compiled module (torch.compile of the rewritten graph), or the GraphModule; either
        has `.report`, the `Report` that `inspect` returns.

    Raises:
        RepShiftError: a subclass per cause (bad option, training mode, untraceable model, bad
            example input, no residual MLP, a site that cannot be pruned safely).
    """
    check_compile_options(compile_options)
    config = Config(keep=keep, at=at, site=site, distance=distance, residual=residual, score=score,
                    protect=protect, sdpa=sdpa, target_flops=target_flops, mode=mode, fuse=fuse, reduce=reduce,
                    restore=restore, r=r, merge_metric=merge_metric, size_attention=size_attention,
                    shift_guidance=shift_guidance)
    with reuse_traces():  # one trace per call: the report and restore's retries read copies of it
        gm, report = run(model, example_input, config, flops=False)
    gm.report = report
    guard = InputGuard(gm.forward, as_args(example_input, model))  # another input size: an ExampleInputError
    if not compile:
        gm.register_forward_pre_hook(guard, with_kwargs=True)
        return gm
    if "compile_mode" in compile_options:
        compile_options["mode"] = compile_options.pop("compile_mode")
    compiled = torch.compile(gm, **compile_options)
    compiled.register_forward_pre_hook(guard, with_kwargs=True)  # on the wrapper: checked before dynamo runs
    return compiled


def check_compile_options(options: dict) -> None:
    """Keywords compress() passes on must be torch.compile's; a typo is a ConfigError naming the
    nearest option of either, before anything runs."""
    check_names(options, option_names() + list(COMPILE_KEYWORDS) + ["compile_mode", "compile"])


def inspect(model: torch.nn.Module, example_input, **config) -> Report:
    """What `compress(model, example_input, **config)` would do, without compiling.

    Returns a `Report`: blocks and their module paths, tokens in and out of every block, where
    attention is fused (SDPA, rewritten, MultiheadAttention, kept explicit and why), the prefix
    tokens and the GFLOPs per sample before and after. `print(report)` shows it as a table.
    A model compress() refuses (UnsupportedSiteError) still gets its table, nothing pruned, with
    the refused block marked and the reason under "refused" (repshift_fx/report/refusals.py).
    """
    config.pop("compile", None)
    config = Config.from_kwargs(**config)
    with reuse_traces():
        try:
            gm, report = run(model, example_input, config, flops=True)
        except UnsupportedSiteError as error:
            return refused_report(model, example_input, config, error)
    return report
