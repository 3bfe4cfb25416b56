"""Pieces of the device benchmark (tools/gpu_bench.py): ToMe as its authors publish it, device-aware
timing, the attention kernels a call runs (read from torch.profiler), its peak memory, the plot.

    tome = PublishedToMe(vit, r=10)                 # ToMe's own algorithm on a timm VisionTransformer
    r, ratio = tome_r_for_flops(vit, x, 0.68)       # the r whose FLOPs are nearest 0.68 of the model's
    timed = synced(fn, "cuda")                      # returns when the GPU is done: for time_variants
    kernels = attention_kernels(fn, (x,), "cuda")   # Counter({"flash": 12}) or {"flash": 9, "softmax": 3}
    peak_mib(fn, (x,), "cuda")                      # max_memory_allocated of one call; None on CPU

`PublishedToMe` follows ToMe's code (github.com/facebookresearch/ToMe, tome/merge.py and
tome/patch/timm.py): explicit softmax(q k^T * scale + log size) v attention in every block, the
keys averaged over heads as the metric, bipartite soft matching between attention and MLP in
every block, a size-weighted mean (merge_wavg), the kept tokens concatenated unmerged-first. It
shares no code with the pass's score="tome", so each checks the other; `eager_drop` is the paper's
drop written out by hand likewise.
"""
from __future__ import annotations

import math
from collections import Counter

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from repshift_fx.flops import per_sample_gmacs


def bipartite_soft_matching(metric: torch.Tensor, r: int, class_token: bool):
    """ToMe's matching: alternate tokens into sets A and B, merge the r A tokens most similar to
    their best B token into it. Returns merge(x, mode) -> (B, N - r, C)."""
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[..., 0, :] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=1)[0]  # the class token stays first

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    return merge


def merge_wavg(merge, x: torch.Tensor, size: torch.Tensor | None):
    """ToMe's size-weighted average: -> merged x, merged size (B, N', 1)."""
    size = torch.ones_like(x[..., 0, None]) if size is None else size
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def tome_attention(attn: nn.Module, x: torch.Tensor, size: torch.Tensor | None):
    """ToMeAttention.forward: explicit attention with the log-size bias; -> output, keys averaged over heads."""
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
    weights = (q @ k.transpose(-2, -1)) * attn.scale
    if size is not None:
        weights = weights + size.log()[:, None, None, :, 0]
    out = (weights.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, -1)
    return attn.proj(attn.norm(out) if hasattr(attn, "norm") else out), k.mean(1)


class PublishedToMe(nn.Module):
    """A timm VisionTransformer run block by block with ToMe's algorithm, r merges per block
    (an int for every block, as ToMe's patch sets it, or one per block); capped per block at
    half the non-class tokens, as ToMe's matching caps it."""

    def __init__(self, vit: nn.Module, r):
        super().__init__()
        if vit.num_prefix_tokens > 1:
            raise ValueError("PublishedToMe protects a class token only (ToMe's distillation case is not written)")
        self.vit = vit
        self.rs = list(r) if isinstance(r, (list, tuple)) else [r] * len(vit.blocks)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        vit, class_token = self.vit, self.vit.num_prefix_tokens == 1
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(img))))
        size = None
        for block, r in zip(vit.blocks, self.rs):
            out, metric = tome_attention(block.attn, block.norm1(x), size)
            x = x + block.drop_path1(block.ls1(out))
            r = min(r, (x.shape[1] - class_token) // 2)
            if r > 0:
                x, size = merge_wavg(bipartite_soft_matching(metric, r, class_token), x, size)
            x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return vit.forward_head(vit.norm(x))


def tome_r_for_flops(vit: nn.Module, x: torch.Tensor, target: float) -> tuple[int, float]:
    """The r (the same in every block) whose FLOPs over the model's are nearest `target`
    (counted by torch.utils.flop_counter); -> (r, that ratio)."""
    base = per_sample_gmacs(vit, (x,))
    ratios = {0: 1.0}
    for r in range(1, vit.patch_embed.num_patches // 2 + 1):
        ratios[r] = per_sample_gmacs(PublishedToMe(vit, r), (x,)) / base
        if ratios[r] <= target or ratios[r] == ratios[r - 1]:
            break
    r = min(ratios, key=lambda k: abs(ratios[k] - target))
    return r, ratios[r]


def eager_drop(model, x, keep: float = 0.7):
    """The paper's rule on a timm ViT, by hand: after blocks d/4, d/2, 3d/4 keep the ceil(keep * n)
    tokens whose MLP output is farthest (L2) from the MLP's input, in order, the class token first."""
    depth, prefix = len(model.blocks), model.num_prefix_tokens
    at = {depth // 4, depth // 2, 3 * depth // 4}
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    for i, block in enumerate(model.blocks):
        mid = x + block.ls1(block.attn(block.norm1(x)))
        branch = block.ls2(block.mlp(block.norm2(mid)))
        x = mid + branch
        if i in at:
            shift = (branch - mid).norm(dim=-1)[:, prefix:]
            count = math.ceil(round(keep * shift.shape[1], 9))
            index = shift.topk(count, dim=1).indices.sort(dim=1).values + prefix
            x = torch.cat([x[:, :prefix], x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))], dim=1)
    return model.forward_head(model.norm(x))


def synced(fn, device: str):
    """fn, made to return only when the device is done (CUDA runs asynchronously)."""
    if device != "cuda":
        return fn

    def call(*args, **kwargs):
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return out

    return call


# aten's fused attention kernels, by their profiler names (the longest name first: the CPU flash
# kernel's name starts like the CUDA one's)
SDPA_KERNELS = {
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash_cpu",
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
    "aten::_scaled_dot_product_attention_math": "sdpa_math",
}


def kernel_counts(events, device: str) -> Counter:
    """Fused attention kernels by kind, and softmax kernels (explicit attention: softmax + bmm),
    in a profiler's events. Softmax counts device kernels on CUDA (a compiled graph's Triton
    kernels, eager's cunn_SoftMax), and on CPU Inductor's named C++ kernels or aten::_softmax."""
    found = Counter()
    for event in events:
        name = event.name
        if name in SDPA_KERNELS:
            found[SDPA_KERNELS[name]] += 1
        elif "softmax" in name.lower() and name != "aten::softmax":
            on_device = event.device_type == torch.autograd.DeviceType.CUDA
            if on_device == (device == "cuda"):
                found["softmax"] += 1
    return found


# fused attention by the names of its CUDA kernels: what a CUDA graph replay shows, with no aten op
DEVICE_KERNELS = {"flash_fwd": "flash", "fmha": "efficient", "efficient_attention": "efficient", "cudnn": "cudnn"}


def graph_kernel_counts(events) -> Counter:
    """Fused attention kernels by their device names, marked "(kernel)": a replayed CUDA graph
    (mode="reduce-overhead") dispatches no aten op, so kernel_counts sees only its softmaxes."""
    found = Counter()
    for event in events:
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kind = next((k for part, k in DEVICE_KERNELS.items() if part in event.name.lower()), None)
            found.update([f"{kind} (kernel)"] if kind else [])
    return found


def attention_kernels(fn, args: tuple, device: str) -> Counter:
    """The attention kernels one call `fn(*args)` runs (warmed up before), read from torch.profiler.
    On CPU, compiled code names its C++ kernels only with torch._inductor.config.cpp.enable_kernel_profile."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.inference_mode(), profile(activities=activities) as prof:
        synced(fn, device)(*args)
    found = kernel_counts(prof.events(), device)
    if device == "cuda" and not set(found) & set(SDPA_KERNELS.values()):
        found.update(graph_kernel_counts(prof.events()))
    return found


def kernel_label(counts: Counter) -> str:
    """"flash x9, softmax x3": what ran per call (each block runs one attention)."""
    return ", ".join(f"{name} x{n}" for name, n in sorted(counts.items())) or "none seen"


def peak_mib(fn, args: tuple, device: str) -> float | None:
    """Peak memory allocated by torch during one call, MiB (CUDA); None elsewhere."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        synced(fn, device)(*args)
    return torch.cuda.max_memory_allocated() / 2**20


def rel_err(got, want) -> float:
    """max |got - want| / max |want|, in fp32."""
    got, want = got.float(), want.float()
    return ((got - want).abs().max() / want.abs().max()).item()


def min_cosine(got, want) -> float:
    """The smallest cosine, over the samples, of the flattened outputs."""
    return torch.nn.functional.cosine_similarity(got.float().flatten(1), want.float().flatten(1)).min().item()


def plot_speedups(rows: list[dict], path, title: str) -> None:
    """Speedup against FLOP ratio (tools/gpu_bench.py's rows), one series per model and dtype; the
    dashed line is speedup = 1 / ratio, the whole FLOP gain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for model, dtype in dict.fromkeys((r["model"], r["dtype"]) for r in rows):
        points = [r for r in rows if r["model"] == model and r["dtype"] == dtype and r["mode"] == "default"]
        ax.scatter([r["flop_ratio"] for r in points], [r["speedup"] for r in points],
                   label=f"{model.split('_patch')[0]} {dtype}")
        for r in points:
            ax.annotate(r["row"], (r["flop_ratio"], r["speedup"]), fontsize=7)
    ratios = [r["flop_ratio"] for r in rows] or [1.0]
    grid = [min(ratios) + (1 - min(ratios)) * i / 20 for i in range(21)]
    ax.plot(grid, [1 / g for g in grid], "--", color="grey", label="speedup = 1 / FLOP ratio")
    ax.set_xlabel("FLOP ratio (reduced / unpruned)")
    ax.set_ylabel("speedup over compiled unpruned")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
