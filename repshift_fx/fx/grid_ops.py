"""Reading the ops of a CNN graph by meaning: what an op does to a (B, C, H, W) grid.

`symbolic_trace` writes `self.conv(x)` (call_module), dynamo and hand-written models write
`F.conv2d(x, w, ...)` (call_function). `grid_op` maps both to one name; `window` reads the
kernel, stride, padding and dilation of a convolution or pooling along H and W. For token models:
`token_grid` says how the patch tokens lay before they were flattened, `grid_residuals` whether
the residual stream is a grid (a CNN, for which tokens mode has no sites).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx
from torch import nn

from repshift_fx.fx.nodes import in_module, literal_arg, module_path, op_name, shape
from repshift_fx.fx.positions import TOKEN_AXIS

_MODULES = (
    (nn.Conv2d, "conv2d"),
    (nn.BatchNorm2d, "batch_norm"),
    (nn.GroupNorm, "group_norm"),
    (nn.ReLU6, "relu6"),
    (nn.Hardtanh, "hardtanh"),
    (nn.LeakyReLU, "leaky_relu"),
    (nn.MaxPool2d, "max_pool2d"),
    (nn.AvgPool2d, "avg_pool2d"),
    (nn.AdaptiveAvgPool2d, "adaptive_avg_pool2d"),
    (nn.AdaptiveMaxPool2d, "adaptive_max_pool2d"),
    (nn.Upsample, "interpolate"),
    (nn.ConstantPad2d, "pad"),
    (nn.ZeroPad2d, "pad"),
    (nn.Flatten, "flatten"),
)
_ALIASES = {"upsample": "interpolate", "upsample_nearest2d": "interpolate", "upsample_bilinear2d": "interpolate",
            "cat": "cat", "concat": "cat", "concatenate": "cat", "convolution": "conv2d"}

POINTWISE = {
    "relu", "relu6", "hardtanh", "gelu", "silu", "sigmoid", "hardswish", "hardsigmoid", "mish", "elu",
    "leaky_relu", "identity", "dropout", "drop_path", "contiguous", "clone", "to", "float",
}
ELEMENTWISE = {"add", "sub", "mul", "truediv", "div", "where", "maximum", "minimum"}


def grid_op(node: torch.fx.Node, gm: torch.fx.GraphModule | None = None) -> str:
    """The op a node performs, e.g. 'conv2d', 'batch_norm', 'relu', 'add', 'cat', 'interpolate'."""
    if node.op == "call_module" and gm is not None:
        module = gm.get_submodule(node.target)
        for cls, name in _MODULES:
            if isinstance(module, cls):
                return name
    name = op_name(node, gm)
    return _ALIASES.get(name, name)


def is_grid(node) -> bool:
    """A (B, C, H, W) tensor with a spatial extent (H or W above 1)."""
    s = shape(node)
    return s is not None and len(s) == 4 and (s[2] > 1 or s[3] > 1)


def spatial(node) -> tuple[int, int] | None:
    s = shape(node)
    return (s[2], s[3]) if s is not None and len(s) == 4 else None


def _pair(value) -> tuple:
    if isinstance(value, (tuple, list)):
        return tuple(value) * 2 if len(value) == 1 else tuple(value)
    return (value, value)


@dataclass(frozen=True)
class Window:
    """A sliding window along H and W: kernel, stride, padding (begin, end), dilation, ceil_mode."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]
    dilation: tuple[int, int] = (1, 1)
    ceil_mode: bool = False

    def lost(self, size: int, axis: int, extra_end: int = 0) -> int:
        """Real input lines (not padding) at the end of `size` that no window reaches along
        `axis`, beyond the gap a window narrower than its stride leaves after every window
        anyway (a 1x1 stride-2 convolution skips every other line whatever the count).

        `extra_end` is padding added by a separate pad node before this op."""
        if self.ceil_mode:
            return 0
        begin, end = self.padding[axis]
        padded = size + begin + end
        span = (self.kernel[axis] - 1) * self.dilation[axis] + 1
        if padded < span:
            return size
        tail = (padded - span) % self.stride[axis]
        return max(0, tail - end - extra_end - max(0, self.stride[axis] - span))


    def newly_lost(self, old: int, new: int, axis: int, extra_end: int = 0) -> bool:
        """Lines at the end of `new` that no window reaches, where none were lost at `old`."""
        return bool(self.lost(new, axis, extra_end)) and not self.lost(old, axis, extra_end)

    def out_size(self, size: int, axis: int) -> int:
        """The output length along `axis` for an input of `size` (torch's formula, ceil_mode too)."""
        begin, end = self.padding[axis]
        span = (self.kernel[axis] - 1) * self.dilation[axis] + 1
        stride, room = self.stride[axis], size + begin + end - span
        if not self.ceil_mode:
            return room // stride + 1
        out = -(-room // stride) + 1
        return out - 1 if (out - 1) * stride >= size + begin else out


def window(node: torch.fx.Node, gm: torch.fx.GraphModule) -> Window | None:
    """The window of a conv2d / max_pool2d / avg_pool2d node, None for other ops or unknown forms."""
    op = grid_op(node, gm)
    if op not in ("conv2d", "max_pool2d", "avg_pool2d"):
        return None
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        kernel, stride, padding = m.kernel_size, m.stride, m.padding
        dilation, ceil = getattr(m, "dilation", 1), getattr(m, "ceil_mode", False)
    elif op == "conv2d":
        weight = shape(node.args[1]) if len(node.args) > 1 else None
        if weight is None:
            return None
        kernel = weight[2:]
        stride, padding = literal_arg(node, 3, "stride", 1), literal_arg(node, 4, "padding", 0)
        dilation, ceil = literal_arg(node, 5, "dilation", 1), False
    else:
        kernel = literal_arg(node, 1, "kernel_size")
        stride = literal_arg(node, 2, "stride", None) or kernel
        padding = literal_arg(node, 3, "padding", 0)
        dilation = literal_arg(node, 4, "dilation", 1) if op == "max_pool2d" else 1
        ceil = literal_arg(node, 5 if op == "max_pool2d" else 4, "ceil_mode", False)
    if isinstance(padding, str) or any(isinstance(v, torch.fx.Node) for v in (*_pair(kernel), *_pair(stride))):
        return None  # 'same' / 'valid' padding or computed sizes: not a window we can reason about
    pads = tuple((p, p) for p in _pair(padding))
    return Window(_pair(kernel), _pair(stride), pads, _pair(dilation), bool(ceil))


def pad_end(node: torch.fx.Node, gm: torch.fx.GraphModule) -> tuple[int, int]:
    """Padding a pad node adds at the end of H and W: (bottom, right); (0, 0) for other nodes."""
    if grid_op(node, gm) != "pad":
        return (0, 0)
    if node.op == "call_module":
        pads = gm.get_submodule(node.target).padding
    else:
        pads = literal_arg(node, 1, "pad", ())
    pads = tuple(pads) + (0,) * (4 - len(pads))  # (left, right, top, bottom)
    return (pads[3], pads[1])


# --- token models laid out on a grid (passes/find_sites.py) ---

_CONVS = {"conv1d", "conv2d", "conv3d", "module:Conv1d", "module:Conv2d", "module:Conv3d"}
_AXES = {1: ("length",), 2: ("height", "width"), 3: ("time", "height", "width")}


def token_grid(gm, graph: nx.DiGraph, by_name, first_stream: str, prefix: int) -> str:
    """How the patch tokens lie before they are flattened, from the nearest convolution whose output
    (B, C, *grid) holds one token per position: '4 x 7 x 7 (time x height x width) from conv3d at ...'."""
    tokens = shape(by_name[first_stream])[TOKEN_AXIS] - prefix
    order = {name: i for i, name in enumerate(by_name)}
    for name in sorted(nx.ancestors(graph, first_stream), key=lambda n: -order[n]):
        node = by_name[name]
        out = shape(node) or ()
        if op_name(node, gm) in _CONVS and len(out) >= 3 and math.prod(out[2:]) == tokens:
            grid = out[2:]
            axes = _AXES.get(len(grid), ("axis",) * len(grid))
            return (f"{' x '.join(map(str, grid))} ({' x '.join(axes)}) from {op_name(node, gm).replace('module:', '')} "
                    f"at '{module_path(node) or name}'")
    return ""


def _unwrapped(node, gm):
    """The input of an identity shortcut (nn.Identity, dropout, drop-path), else the node itself."""
    while isinstance(node, torch.fx.Node) and node.op.startswith("call") and node.args \
            and op_name(node, gm) in ("identity", "dropout", "drop_path"):
        node = node.args[0]
    return node


def grid_residuals(gm, graph: nx.DiGraph) -> str:
    """' It adds residuals over (B, C, H, W) maps: ...' for a grid model (ConvNeXt), else ''."""
    for node in gm.graph.nodes:
        if op_name(node, gm) != "add" or len(node.args) != 2:
            continue
        a, b = (_unwrapped(arg, gm) for arg in node.args)
        sa, sb = shape(a), shape(b)
        if sa is None or sa != sb or len(sa) != 4:
            continue
        if nx.has_path(graph, a.name, b.name) or nx.has_path(graph, b.name, a.name):
            return (f" It is a grid model: its residual adds run over {len(sa)}-D maps {sa}, first add in "
                    f"{in_module(node)}; its tokens cannot be dropped one by "
                    "one. Use mode='lines' (rows and columns, repshift_fx's CNN mode) or another model.")
    return ""

