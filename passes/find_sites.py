"""Analyze: find the residual sites of the stream, pair them into blocks, find the prefix tokens.

Expects: a GraphModule whose nodes carry shapes (`capture`). Guarantees: `ctx.analysis` holds
an `Analysis`; the graph is not changed.

A residual site is an `add(x, branch(x))` whose two inputs have one (B, N, C) shape and whose
second input depends on the first. Its branch is classified by the ops on it:

- ``mlp``: every op acts on each token alone (linear, norm over channels, activation, scaling by
  a per-channel weight, ...): the site Representation Shift scores;
- ``attention``: the branch holds SDPA, MultiheadAttention, a softmax or a product of two
  activations;
- ``ssm``: a state-space / recurrent mixer: the branch carries a state along the tokens by a
  prefix scan (cumsum, cumprod, logcumsumexp along a non-channel axis), as the parallel form of
  a selective scan (Mamba, ViM) does;
- ``mixing``: anything else that may move information between tokens (a convolution).

A block is an MLP site together with the token-mixing site just before it on the stream. An SSM
site that no MLP follows is a block of its own (ViM, Mamba: `x + mixer(norm(x))`, no MLP).
Tokens read by position after the last block (a head's `x[:, 0]`) are protected: leading ones
count as prefix tokens, others (ViM's class token in the middle, `x[:, N // 2]`) are kept in
place, and the pruning pass rewrites the read to follow them (`Analysis.protected`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import networkx as nx
import torch.fx

from repshift_fx.errors import NoSiteError
from repshift_fx.fx.grid_ops import grid_residuals, token_grid
from repshift_fx.fx.positions import describe_read, read_positions
from repshift_fx.fx.nodes import (
    common_path,
    in_module,
    data_graph,
    literal_arg,
    module_path,
    nodes_by_name,
    op_name,
    shape,
    tensor_args,
)

TOKEN_AXIS = 1
_POINTWISE = {
    "gelu", "relu", "silu", "sigmoid", "tanh", "hardswish", "mish", "softplus", "elu", "leaky_relu",
    "dropout", "drop_path", "identity", "contiguous", "clone", "to", "float", "half", "bfloat16", "type_as",
    "neg", "exp", "sqrt", "rsqrt", "square", "pow", "abs",
}
_ELEMENTWISE = {"add", "sub", "mul", "truediv", "div", "where", "maximum", "minimum"}
_CHANNEL_SPLITS = {"chunk", "split", "unbind"}
_ATTENTION = {"scaled_dot_product_attention", "multihead_attention", "softmax"}
_PRODUCTS = {"matmul", "bmm", "einsum", "baddbmm"}
_SCANS = {"cumsum", "cumprod", "logcumsumexp", "cummax", "cummin"}


@dataclass
class Site:
    """One residual add on the stream: out = stream + branch."""

    add: str
    stream: str
    branch: str
    kind: str  # "mlp" | "attention" | "ssm" | "mixing"
    module: str
    nodes: frozenset[str]
    reason: str = ""  # why the branch is not token-local, for kind "mixing"
    side_inputs: tuple[str, ...] = ()  # tensors entering the branch that carry the token axis


@dataclass
class Block:
    index: int
    mlp: Site | None  # None: a mixer-only block (an SSM with no MLP after it)
    mixer: Site | None
    tokens: int  # tokens entering the block, prefix included

    @property
    def input(self) -> str:
        return (self.mixer or self.mlp).stream

    @property
    def output(self) -> str:
        return (self.mlp or self.mixer).add

    @property
    def module(self) -> str:
        return common_path([s.module for s in (self.mixer, self.mlp) if s])


@dataclass
class Analysis:
    blocks: list[Block]
    sites: list[Site]  # every residual site on the stream, blocks or not
    prefix: int
    prefix_source: str
    channels: int
    stray: list[Site] = field(default_factory=list)  # sites not paired into a block
    # tokens read by position after the last block, beyond the prefix: {position: (read node, ...)}
    protected: dict[int, tuple[str, ...]] = field(default_factory=dict)
    protected_source: str = ""  # 'position 8 (read by getitem at node ... (module 'root'))'
    grid: str = ""  # how the tokens lie, e.g. "4 x 7 x 7 (time x height x width) from conv3d at 'patch_embed.proj'"


def _is_token_local(node: torch.fx.Node, gm, branch: set[str]) -> bool:
    name = op_name(node, gm)
    if name in _POINTWISE:
        return True
    if name in ("linear", "layer_norm", "rms_norm"):
        if name in ("layer_norm", "rms_norm"):
            normalized = (
                gm.get_submodule(node.target).normalized_shape
                if node.op == "call_module"
                else literal_arg(node, 1, "normalized_shape")
            )
            return normalized is not None and len(tuple(normalized)) == 1
        return True
    if name in _ELEMENTWISE:
        for arg in tensor_args(node):
            if arg.name in branch:
                continue
            s = shape(arg)
            if len(s) >= 2 and s[-2] != 1:  # a side tensor varying along the token axis
                return False
        return True
    if name in _CHANNEL_SPLITS:
        dim = literal_arg(node, 2 if name != "unbind" else 1, "dim", 0)
        rank = len(shape(node.args[0]) or ())
        return dim in (-1, rank - 1)
    if name == "getitem":
        return not isinstance(node.args[0], torch.fx.Node) or shape(node.args[0]) is None
    if name == "stack":  # parallel branches, torch.stack([ffn(x) for ffn in ffns]): a new leading axis
        rank = len(shape(node) or ())
        dim = literal_arg(node, 1, "dim", 0)
        return rank > 0 and isinstance(dim, int) and dim % rank == 0
    if name in _REDUCTIONS:  # RMSNorm written out: x.pow(2).mean(-1, keepdim=True)
        dim = literal_arg(node, 1, "dim")
        dims = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)
        rank = len(shape(node.args[0]) or ())
        return rank > 0 and (all(isinstance(d, int) and d % rank == rank - 1 for d in dims)
                             or _sums_stacked_branches(node.args[0], dims, rank, gm))
    if name in ("view", "reshape", "flatten", "reshape_as", "view_as"):
        return _keeps_rows(shape(node.args[0]), shape(node))
    if name == "batch_norm":  # in eval, an affine map per channel: LeViT's (B * N, C) after a flatten
        return len(shape(node.args[0]) or ()) == 2
    if name in ("addmm", "mm", "matmul"):  # GPT-2's Conv1D: addmm(bias, x.view(-1, C), W)
        data = node.args[1] if name == "addmm" else node.args[0]
        others = [a for a in tensor_args(node) if a is not data]
        return isinstance(data, torch.fx.Node) and data.name in branch and not any(a.name in branch for a in others) \
            and all(len(shape(a) or ()) <= 2 for a in others)
    return False


def _sums_stacked_branches(source, dims: tuple, rank: int, gm) -> bool:
    """A reduction over exactly the axis a `stack` of parallel branches added (ParallelThingsBlock's
    `torch.stack([...]).sum(dim=0)`): each token sums its own outputs of the branches."""
    if not isinstance(source, torch.fx.Node) or op_name(source, gm) != "stack":
        return False
    added = literal_arg(source, 1, "dim", 0)
    return len(dims) == 1 and isinstance(dims[0], int) and isinstance(added, int) and dims[0] % rank == added % rank


_REDUCTIONS = {"mean", "sum", "amax", "amin", "var", "std", "norm", "logsumexp", "linalg_vector_norm"}


def _keeps_rows(before, after) -> bool:
    """A reshape that keeps every token's channels together: it merges or splits the leading
    (batch, token) axes, keeping the channel axis (B, N, C) <-> (B * N, C), or splits the
    channels, keeping (B, N) in front (B, N, C) <-> (B, N, H, D)."""
    if before is None or after is None or not before or not after:
        return False
    if before[-1] == after[-1] and math.prod(before[:-1]) == math.prod(after[:-1]):
        return True
    return len(before) >= 2 and len(after) >= 2 and before[:2] == after[:2]


def _classify(branch_nodes, gm, by_name, stream: str) -> tuple[str, str]:
    members = set(branch_nodes)
    reason = ""
    order = _order(by_name)
    for name in sorted(members, key=order.get):  # a scan first: an SSM's materialized form also multiplies
        node = by_name[name]
        op = op_name(node, gm) if node.op.startswith("call") else ""
        if op in _SCANS and _scans_tokens(node, op):
            return "ssm", f"{op} in {in_module(node)} scans along the tokens"
    for name in sorted(members, key=order.get):
        node = by_name[name]
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        op = op_name(node, gm)
        inner = [a for a in tensor_args(node) if a.name in members or a.name == stream]
        if op in _ATTENTION or (op in _PRODUCTS and len(inner) >= 2):
            return "attention", f"{op} in {in_module(node)}"
        if not reason and not _is_token_local(node, gm, members | {stream}):
            reason = f"{op} in {in_module(node)} may mix tokens"
    return ("mixing", reason) if reason else ("mlp", "")


def _scans_tokens(node: torch.fx.Node, op: str) -> bool:
    """A cumulative op over an axis other than the last (channels) and the first (batch)."""
    dim = literal_arg(node, 1, "dim")
    rank = len(shape(node.args[0]) or ())
    return isinstance(dim, int) and rank >= 3 and dim % rank not in (0, rank - 1)


def _order(by_name: dict) -> dict[str, int]:
    """Position of each node in the graph (a topological order)."""
    return {name: i for i, name in enumerate(by_name)}


def _residual_sites(gm, graph: nx.DiGraph, by_name) -> list[Site]:
    sites = []
    for node in gm.graph.nodes:
        if op_name(node, gm) != "add" or len(node.args) != 2:
            continue
        a, b = node.args
        sa, sb = shape(a), shape(b)
        if sa is None or sa != sb or len(sa) != 3:
            continue
        if nx.has_path(graph, a.name, b.name):
            stream, out = a, b
        elif nx.has_path(graph, b.name, a.name):
            stream, out = b, a
        else:
            continue
        members = (nx.descendants(graph, stream.name) & nx.ancestors(graph, out.name)) | {out.name}
        kind, reason = _classify(members, gm, by_name, stream.name)
        paths = [module_path(by_name[m]) for m in members if by_name[m].op.startswith("call")]
        sites.append(Site(node.name, stream.name, out.name, kind, common_path(paths), frozenset(members), reason))
    nested = set().union(*(s.nodes for s in sites)) if sites else set()
    return [s for s in sites if s.add not in nested]


_WEIGHTED = {"linear", "layer_norm", "rms_norm", "conv1d", "conv2d"}


def side_inputs(site: Site, gm, by_name, counts: set[int]) -> tuple[str, ...]:
    """Tensors entering a branch from outside it (rotary tables, masks, position biases) whose
    shape carries a token count; weights of linear and norm layers are not side inputs."""
    sides = set()
    for name in site.nodes:
        node = by_name[name]
        data = node.args[:1] if op_name(node, gm) in _WEIGHTED else None
        for arg in tensor_args(node):
            if arg.name in site.nodes or arg.name == site.stream:
                continue
            if data is not None and arg not in data:
                continue
            if counts & set(shape(arg) or ()):
                sides.add(arg.name)
    return tuple(sorted(sides))


def _pair_blocks(sites: list[Site], by_name, graph: nx.DiGraph) -> tuple[list[Block], list[Site]]:
    """Each MLP site with the mixer before it on its own stream (a multi-scale block, CoaT's parallel
    blocks, may put another scale's mixer just before it: that one stays apart)."""
    blocks, stray, mixer = [], [], None

    def lone(site: Site) -> None:  # a mixer no MLP follows: an SSM block of its own, else stray
        if site.kind == "ssm":
            blocks.append(Block(len(blocks), None, site, shape(by_name[site.stream])[TOKEN_AXIS]))
        else:
            stray.append(site)

    for site in sites:
        if site.kind != "mlp":
            if mixer is not None:
                lone(mixer)
            mixer = site
            continue
        if mixer is not None and not _same_stream(mixer, site, by_name, graph):
            lone(mixer)
            mixer = None
        stream = mixer.stream if mixer else site.stream
        blocks.append(Block(len(blocks), site, mixer, shape(by_name[stream])[TOKEN_AXIS]))
        mixer = None
    if mixer is not None:
        lone(mixer)
    return blocks, stray


def _same_stream(mixer: Site, mlp: Site, by_name, graph: nx.DiGraph) -> bool:
    """The MLP reads the stream the mixer wrote, over the same tokens."""
    tokens = shape(by_name[mixer.stream])[TOKEN_AXIS], shape(by_name[mlp.stream])[TOKEN_AXIS]
    return tokens[0] == tokens[1] and (mixer.add == mlp.stream or nx.has_path(graph, mixer.add, mlp.stream))


def _find_prefix(gm, graph: nx.DiGraph, by_name, first_stream: str, weights, hints=None) -> tuple[int, str]:
    """Count the learned tokens (CLS, distillation, registers) concatenated before the patches.

    `hints` maps placeholders to the (prefix, source) an earlier graph found for them: when
    dynamo splits a model, the cat may lie in the graph before this one."""
    hints = hints or {}
    inputs = {n.name for n in gm.graph.nodes if n.op == "placeholder" and n.name not in weights}
    tokens = shape(by_name[first_stream])[TOKEN_AXIS]
    candidates = nx.ancestors(graph, first_stream) | {first_stream}
    order = _order(by_name)
    for name in sorted(candidates, key=lambda n: -order[n]):  # nearest cat first
        node = by_name[name]
        if name in hints and len(shape(node) or ()) > TOKEN_AXIS and shape(node)[TOKEN_AXIS] == tokens:
            return hints[name]
        if _token_cat(gm, graph, node, tokens, inputs) is None:
            continue
        count, names = 0, []
        for part in node.args[0]:
            if inputs & (nx.ancestors(graph, part.name) | {part.name}):
                break
            count += shape(part)[TOKEN_AXIS]
            sources = [by_name[a] for a in nx.ancestors(graph, part.name) | {part.name}]
            names += [str(a.target) for a in sources if a.op in ("get_attr", "placeholder")] or ["a computed token"]
        return count, "concatenated before the first block: " + (", ".join(names) or "no learned tokens")
    return 0, "no token concatenation found before the first block"


def _token_cat(gm, graph: nx.DiGraph, node, tokens: int, inputs: set) -> list | None:
    """The parts of `node` if it is the cat that makes the tokens: along the token axis, of
    `tokens` tokens, one part at least computed from the model's inputs (the patches; a cat of
    learned tables alone, such as YOLOS's position embeddings, is none). [(part, from inputs)]."""
    if op_name(node, gm) != "cat" or shape(node)[TOKEN_AXIS] != tokens:
        return None
    if literal_arg(node, 1, "dim", 0) not in (TOKEN_AXIS, TOKEN_AXIS - len(shape(node))):
        return None
    parts = [(part, bool(inputs & (nx.ancestors(graph, part.name) | {part.name}))) for part in node.args[0]]
    return parts if any(found for _, found in parts) else None


def _learned_suffix(gm, graph: nx.DiGraph, by_name, first_stream: str, weights) -> int:
    """Learned tokens concatenated after the patches (YOLOS's detection tokens): how many."""
    inputs = {n.name for n in gm.graph.nodes if n.op == "placeholder" and n.name not in weights}
    tokens = shape(by_name[first_stream])[TOKEN_AXIS]
    order = _order(by_name)
    for name in sorted(nx.ancestors(graph, first_stream) | {first_stream}, key=lambda n: -order[n]):
        parts = _token_cat(gm, graph, by_name[name], tokens, inputs)
        if parts is not None:
            last = max(i for i, (_, found) in enumerate(parts) if found)
            return sum(shape(part)[TOKEN_AXIS] for part, _ in parts[last + 1:])
    return 0


def prefix_of(gm: torch.fx.GraphModule, node: str, weights: frozenset[str] = frozenset(), hints=None) -> tuple[int, str]:
    """(prefix tokens, where they come from) for the (B, N, C) tokens at `node`; (0, why) if none."""
    if len(shape(nodes_by_name(gm)[node]) or ()) != 3:
        return 0, f"'{node}' is not a (B, N, C) tensor"
    return _find_prefix(gm, data_graph(gm), nodes_by_name(gm), node, weights, hints)


def analyze(gm: torch.fx.GraphModule, weights: frozenset[str] = frozenset(), hints=None) -> Analysis:
    """Sites, blocks and prefix of `gm`; `hints`: see `_find_prefix`."""
    by_name = nodes_by_name(gm)
    graph = data_graph(gm)
    sites = _residual_sites(gm, graph, by_name)
    blocks, stray = _pair_blocks(sites, by_name, graph)
    if not blocks:
        found = ", ".join(f"{s.kind} at '{s.module}'" if s.module else f"{s.kind} in the model's own forward"
                          for s in sites) or "no residual add over tokens"
        raise NoSiteError(
            "no residual MLP (an add of x and a token-local branch of x over (B, N, C) tokens) was "
            f"found in {type(gm).__name__}; found: {found}. Representation Shift scores tokens at "
            f"such sites; for CNNs use the line-wise mode.{grid_residuals(gm, graph)}"
        )
    prefix, source = _find_prefix(gm, graph, by_name, blocks[0].input, weights, hints)
    reads = read_positions(gm, graph, by_name, blocks[-1].output)
    leading = _leading(prefix, reads)
    if leading > prefix:
        where = "; ".join(describe_read(by_name, gm, reads[p]) for p in sorted(reads) if p < leading)
        prefix, source = leading, f"{source}; the first {leading} token(s) read by position: {where}"
    protected = {p: reads[p] for p in sorted(reads) if p >= prefix}
    protected_source = ", ".join(f"position {p} (read by {describe_read(by_name, gm, names)})"
                                 for p, names in protected.items())
    suffix = _learned_suffix(gm, graph, by_name, blocks[0].input, weights)
    if suffix:
        tokens = shape(by_name[blocks[0].input])[TOKEN_AXIS]
        protected.update({p: protected.get(p, ()) for p in range(tokens - suffix, tokens)})
        protected_source += ("; " if protected_source else "") + \
            f"the last {suffix} token(s): learned tokens concatenated after the patches"
    for site in sites:
        tokens = shape(by_name[site.stream])[TOKEN_AXIS]
        site.side_inputs = side_inputs(site, gm, by_name, {tokens, tokens - prefix} - {0, 1})
    channels = shape(by_name[blocks[0].input])[-1]
    grid = token_grid(gm, graph, by_name, blocks[0].input, prefix)
    return Analysis(blocks, sites, prefix, source, channels, stray, grid=grid, protected=protected,
                    protected_source=protected_source)


def _leading(prefix: int, reads: dict) -> int:
    """The prefix grown over the positions read right after it (x[:, 0], x[:, :4])."""
    while prefix in reads:
        prefix += 1
    return prefix


def run(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    ctx.analysis = analyze(gm, ctx.weight_placeholders, getattr(ctx, "prefix_hints", None))
    if ctx.analysis.grid:
        ctx.notes.append(f"tokens: {ctx.analysis.grid}; a drop keeps any of them, across every axis")
    return gm
