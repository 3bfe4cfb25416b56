"""torch.compile(model, backend="repshift"): the passes of `compress()`, inside dynamo.

    compiled = torch.compile(model, backend="repshift")              # the defaults of compress()
    compiled = torch.compile(model, backend=repshift_fx.backend(keep=0.5, at=(3, 6, 9)), dynamic=None)

Expects: the graphs dynamo hands a backend, one per piece of the model it captured: parameters
lifted to placeholders, `F.linear` and `layer_norm` as functions, the token count a literal, the
batch a literal or a symbol. For each graph the backend records every node's shape on the example
inputs dynamo passes (repshift_fx/compile/dynamo_graph.py), finds the blocks (passes/find_sites.py),
numbers them as the model does (their place in its block container: `blocks.7` is block 7 in
whatever graph it lands), prunes the blocks of `at` that lie in this graph (the rewrite passes of
`compress()`), and hands the result to `inner` ("inductor" by default, "eager" for debugging).

Guarantees:
- A graph with no block, or with no block of `at`, goes to `inner` unchanged.
- Token counts are static: symbolic sizes other than the batch (dimension 0 of the inputs) are
  pinned, so another resolution fails dynamo's guards and recompiles with its own counts; the
  batch stays dynamic (batch sizes 1, 2, 7 and 32 take two compiles).
- Prefix tokens (CLS, registers) concatenated in one graph are known in the next: outputs that
  carry them are noted, by tensor identity, as the compiled graph returns them.
- Refused with a `RepShiftError` (dynamo raises it wrapped in BackendCompilerFailed), never a
  wrong shape at run time: a literal size the pass cannot attribute, pruned tokens that would
  leave the graph (a graph break after the drop, or a dense head), a graph that is one block's
  own forward (a graph break in the loop over the blocks), a model in training mode without
  `train=True`.
- `train=True`: graphs captured in training mode are pruned too (dropout and drop-path kept), and
  `loss.backward()` runs through the reduction (AOTAutograd traces the rewritten graph's backward).

The logger `repshift_fx` reports at INFO what each graph got (the drops, the tokens entering each
block, the graphs left alone); a `RepShiftBackend` keeps one `Report` per pruned graph in `.reports`.
"""
from __future__ import annotations

import dataclasses
import logging

import networkx as nx
import torch
import torch.fx
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from repshift_fx.capture.state import untouched
from repshift_fx.config import Config, config_from
from repshift_fx.context import PassContext
from repshift_fx.compile.dynamo_graph import (
    check_inference,
    concrete_args,
    frame_module,
    graph_name,
    is_weight,
    pin_token_axes,
    record_shapes,
    refresh_example_values,
)
from repshift_fx.errors import ConfigError, NoSiteError, UnsupportedSiteError
from repshift_fx.fx.nodes import data_graph, name_modules_as_user, nodes_by_name, shape, value_phrase
from repshift_fx.fx.grid_ops import is_grid
from repshift_fx.modes import LINES, TOKENS, choose
from repshift_fx.passes import find_sites
from repshift_fx.plan.tokens import default_at, tome_blocks
from repshift_fx.report.tokens import Report, build_report

log = logging.getLogger("repshift_fx")

_PREFIX_OF = WeakIdKeyDictionary()  # a tensor some compiled graph returned -> (prefix tokens, source)


class RepShiftBackend:
    """A dynamo backend: prune each graph it is handed as `compress()` would, then compile it
    with `inner`. Build it with `repshift_fx.backend(...)`; `.reports` holds one `Report` per
    graph it pruned."""

    def __init__(self, config: Config, inner="inductor"):
        self.config = config
        self.inner = inner
        self.reports: list[Report] = []
        self.__name__ = "repshift"  # dynamo names backends in its logs

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.config).items())
        return f"repshift_fx.backend({options}, inner={self.inner!r})"

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        if not isinstance(gm, torch.fx.GraphModule):
            raise ConfigError(f"a torch.compile backend is called by torch.compile with the graphs dynamo captures, "
                              f"not with a {type(gm).__name__}: torch.compile(model, backend=repshift_fx.backend()), "
                              "or repshift_fx.compress(model, x) for the whole model at once")
        gm, report, prefix_outputs = prune_graph(gm, list(example_inputs), self.config)
        if report is not None:
            self.reports.append(report)
        compiled = resolve_backend(self.inner)(gm, example_inputs)
        return _noting_prefix(compiled, prefix_outputs)


def backend(*, inner="inductor", **options) -> RepShiftBackend:
    """A torch.compile backend that prunes tokens by Representation Shift.

        torch.compile(model, backend=repshift_fx.backend(keep=0.5, at=(3, 6, 9)))

    The options are the fields of `repshift_fx.Config`, as for `repshift_fx.compress` (the same
    meaning, checked by the same `config_from`; `mode` "auto" prunes a CNN's graph by rows and
    columns, as compress() does) but target_flops, which needs the whole model: so the default is the
    paper's rule (Config's), not compress()'s FLOP-targeted default reduction; in tokens mode `at`
    counts the model's blocks even where dynamo splits the model into several graphs, in lines mode
    the residual blocks of the one graph that holds them all. `inner` is the backend the rewritten
    graph is handed to: "inductor" (default), "eager" (debugging), any name
    `torch._dynamo.list_backends()` shows, or a backend callable.

    Raises:
        ConfigError: a bad or unknown option or an unknown `inner`, at once. What the passes refuse
        is raised at the first call (dynamo wraps it in BackendCompilerFailed).
    """
    config, _ = config_from(options, backend)
    if config.target_flops is not None:
        raise ConfigError("target_flops is compress()'s: the backend sees one graph at a time, not the whole "
                          "model's FLOPs; pass keep= (repshift_fx.inspect(model, x, target_flops=...).budget "
                          "says the keep compress() would choose)")
    resolve_backend(inner)  # an unknown name fails here, not at the first call
    return RepShiftBackend(config, inner)


def prune_graph(gm: torch.fx.GraphModule, example_inputs: list, config: Config):
    """Prune one dynamo graph in place: (graph, its Report or None if untouched, prefix outputs).
    The graph runs here on the example inputs: the buffers among them (BatchNorm statistics in
    training) and the random streams are left as they were."""
    if not config.train:
        check_inference(gm)
    with untouched(_buffers(example_inputs)):
        return _prune_graph(gm, example_inputs, config)


def _buffers(example_inputs: list) -> list[torch.Tensor]:
    """The real, non-parameter tensors among dynamo's example inputs: buffers a training graph
    updates in place (and user inputs, cheap to keep)."""
    from torch._subclasses.fake_tensor import is_fake

    return [t for t in example_inputs if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter)
            and not is_fake(t)]


def _prune_graph(gm: torch.fx.GraphModule, example_inputs: list, config: Config):
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    weights = frozenset(n.name for n, ex in zip(inputs, example_inputs) if is_weight(n, ex))
    pin_token_axes(inputs, weights)
    args = concrete_args(inputs, example_inputs, weights)
    record_shapes(gm, args)
    name_modules_as_user(gm, frame_module())
    hints = {n.name: _PREFIX_OF[ex] for n, ex in zip(inputs, example_inputs)
             if isinstance(ex, torch.Tensor) and ex in _PREFIX_OF}
    prefix_outputs = _prefix_outputs(gm, weights, hints)
    ctx = PassContext(config=config, args=args, model_name=graph_name(gm), weight_placeholders=weights,
                      prefix_hints=hints)
    try:
        mode = choose(gm, ctx)
    except NoSiteError:
        log.info("%s: no blocks; left as it is", ctx.model_name)
        return gm, None, prefix_outputs
    if mode is LINES:  # a CNN's graph: rows and columns
        return (*_prune_lines(gm, ctx), prefix_outputs)
    local = _localize(ctx, frame_module())
    if local is None:
        return gm, None, prefix_outputs
    _warn_unknown_prefix(gm, ctx)
    leaving = _pruned_outputs(gm, ctx, local.at[0])
    if leaving:
        last = len(ctx.analysis.blocks) - 1
        if local.restore is False or min(local.at) == last:  # no block here would run on fewer tokens
            _refuse_pruned_outputs(ctx, local.at[0], leaving[0])
        local = dataclasses.replace(local, restore=True)  # every token back before they leave the graph
    ctx.config = local
    gm, ctx = _rewrite_tokens(gm, ctx)
    refresh_example_values(gm)
    return gm, _report(ctx), prefix_outputs


def _rewrite_tokens(gm: torch.fx.GraphModule, ctx: PassContext) -> tuple[torch.fx.GraphModule, PassContext]:
    """The tokens-mode plan and rewrite, as in compress(): the planner puts tokens back, or makes a drop
    MLP-only, where what follows needs every token."""
    return TOKENS.plan_and_rewrite(gm, ctx), ctx


def _prune_lines(gm: torch.fx.GraphModule, ctx: PassContext):
    """Lines mode on one analysed graph: (the graph, its LineReport)."""
    _refuse_map_outputs(gm, ctx, ctx.analysis.sites[-1])
    gm = LINES.plan_and_rewrite(gm, ctx)
    refresh_example_values(gm)
    return gm, LINES.report(None, gm, ctx, False, None)


def _refuse_map_outputs(gm: torch.fx.GraphModule, ctx: PassContext, last) -> None:
    """The map after the last residual block must not leave the graph: lines mode numbers the
    blocks of one graph, so the stream must end (pooled) in it. A map output there is a graph
    break that splits the blocks over several graphs, or a model that returns its feature map."""
    for node in _outputs_after(gm, last.output):
        if is_grid(node):
            raise UnsupportedSiteError(
                f"an output of {ctx.model_name} ({value_phrase(node, gm)}) {tuple(shape(node))} is the feature map "
                f"after residual block {last.index} ({last.module or '-'}): either dynamo breaks the graph there (a print, .item(), "
                "data-dependent control flow) and the blocks lie in more than one graph, which lines mode cannot "
                "number, or the model returns its map, which a drop would shrink. Remove the graph break "
                "(torch._dynamo.explain(model)(x) lists them), or use repshift_fx.compress() on a model that pools."
            )


def _outputs_after(gm: torch.fx.GraphModule, name: str) -> list[torch.fx.Node]:
    """The inputs of `gm`'s output node that are node `name` or depend on it, in output order."""
    after = nx.descendants(data_graph(gm), name) | {name}
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    return [node for node in out.all_input_nodes if node.name in after]


def resolve_backend(inner, option: str = "inner"):
    """A torch.compile backend from its name or itself (a callable); ConfigError naming `option`."""
    if callable(inner):
        return inner
    from torch._dynamo.backends.registry import list_backends, lookup_backend

    if not isinstance(inner, str):
        raise ConfigError(f"{option} must be a torch.compile backend: a name such as 'inductor' or 'eager', or a "
                          f"callable (gm, example_inputs) -> callable; got {type(inner).__name__} {inner!r}")
    if inner == "repshift":
        raise ConfigError(f"{option}='repshift' would prune twice; name the backend that compiles the pruned graph")
    try:
        return lookup_backend(inner)
    except Exception as err:
        raise ConfigError(
            f"{option}={inner!r} is not a torch.compile backend; use 'inductor', 'eager' or one of "
            f"{list_backends(exclude_tags=())}"
        ) from err


def _prefix_outputs(gm: torch.fx.GraphModule, weights, hints) -> dict[int, tuple[int, str]]:
    """Outputs of this graph that carry prefix tokens first: {output index: (prefix, source)}."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    flat = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    found = {}
    for i, value in enumerate(flat):
        if isinstance(value, torch.fx.Node) and len(shape(value) or ()) == 3:
            prefix, source = find_sites.prefix_of(gm, value.name, weights, hints)
            if prefix:
                found[i] = (prefix, source)
    return found


def _noting_prefix(compiled, outputs: dict):
    """Wrap a compiled graph so that the outputs carrying prefix tokens are known to the next graph."""
    if not outputs:
        return compiled

    def run(*args):
        result = compiled(*args)
        for i, info in outputs.items():
            if isinstance(result[i], torch.Tensor):
                _PREFIX_OF[result[i]] = info
        return result

    return run


def _model_numbering(blocks, root: nn.Module | None) -> tuple[int, int | None]:
    """(the model's number of this graph's first block, the model's depth or None if unknown).

    Blocks are numbered by their place in their container (a ModuleList or Sequential, such as
    timm's `blocks` or torchvision's `encoder.layers`), read on the module dynamo compiles; without
    it, by a module path that ends in a number (`blocks.7`); else in graph order from 0."""
    paths = [b.module for b in blocks]
    if len(blocks) == 1 and not paths[0]:
        raise UnsupportedSiteError(
            f"dynamo handed repshift_fx one block's own forward ({type(root).__name__ if root else 'a block'}): "
            "a graph break in the loop over the blocks (a print, .item(), data-dependent control flow) makes "
            "dynamo compile the blocks one by one, and this one graph then runs for every block, so it "
            "cannot prune one of them. Remove the graph break (torch._dynamo.explain(model)(x) lists them), "
            "or use repshift_fx.compress()."
        )
    parents = {p.rpartition(".")[0] for p in paths}
    container = _submodule(root, parents.pop()) if root is not None and len(parents) == 1 else None
    if isinstance(container, (nn.ModuleList, nn.Sequential)):
        names = list(container._modules)
        index = [names.index(p.rpartition(".")[2]) if p.rpartition(".")[2] in names else -1 for p in paths]
        if index == list(range(index[0], index[0] + len(index))) and index[0] >= 0:
            return index[0], len(names)
    tails = [p.rpartition(".")[2] for p in paths]
    if all(t.isdigit() for t in tails):
        index = [int(t) for t in tails]
        if index == list(range(index[0], index[0] + len(index))):
            return index[0], None
    return 0, None


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        return None


def _localize(ctx: PassContext, root: nn.Module | None) -> Config | None:
    """The config for this graph: `at` and its amounts (keep, or ToMe's r; the model's numbers)
    mapped to this graph's blocks, or None when no block of `at` is here. ToMe without `at` merges
    in every block of this graph. Sets `ctx.block_offset` for the logs."""
    config, blocks = ctx.config, ctx.analysis.blocks
    offset, depth = _model_numbering(blocks, root)
    if depth is None and offset == 0:
        depth = len(blocks)  # the numbering starts here: taken to hold every block
    ctx.block_offset = offset
    field = "r" if config.score == "tome" else "keep"
    if config.at is None and config.score == "tome":  # ToMe merges in every block: this graph's, by the planner
        if isinstance(config.r, tuple) and not (offset == 0 and depth == len(blocks)):
            raise ConfigError(f"{ctx.model_name} holds blocks {offset}..{offset + len(blocks) - 1} of a model split by "
                              "graph breaks: give r per block with at= (the model's block numbers), or one r")
        prefix = ctx.analysis.prefix if config.protect == "auto" else int(config.protect)
        return dataclasses.replace(config, at=tome_blocks(ctx.analysis, prefix))
    if config.at is None:
        if depth is None:
            raise ConfigError(
                f"{ctx.model_name} holds blocks {offset}..{offset + len(blocks) - 1} of a model split by "
                "graph breaks, and the model's depth is unknown here: pass at= explicitly"
            )
        at = default_at(depth)
        if not at:
            raise ConfigError(f"the model has {depth} blocks: too few for the default schedule; pass at=")
    else:
        at = config.at
    bad = [i for i in at if depth is not None and i >= depth]
    if bad:
        raise ConfigError(
            f"at={at} names block(s) {bad}, but the model has {depth} blocks "
            f"(0..{depth - 1}, first at {blocks[0].module or 'the root'})"
        )
    amount = getattr(config, field)
    amounts = amount if isinstance(amount, tuple) else (amount,) * len(at)
    local = [(i - offset, k) for i, k in zip(at, amounts) if offset <= i < offset + len(blocks)]
    if not local:
        log.info("%s: blocks %d..%d (%s..%s) hold no drop of at=%s; left as it is", ctx.model_name, offset,
                 offset + len(blocks) - 1, blocks[0].module or "-", blocks[-1].module or "-", at)
        return None
    return dataclasses.replace(config, at=tuple(i for i, _ in local), **{field: tuple(k for _, k in local)})


def _warn_unknown_prefix(gm: torch.fx.GraphModule, ctx: PassContext) -> None:
    analysis = ctx.analysis
    if analysis.prefix or ctx.config.protect != "auto":
        return
    by_name = nodes_by_name(gm)
    stream = analysis.blocks[0].input
    tokens = shape(by_name[stream])[1]
    for name in nx.ancestors(data_graph(gm), stream) | {stream}:
        node = by_name[name]
        if node.op == "placeholder" and name not in ctx.weight_placeholders and (shape(node) or ())[1:2] == (tokens,):
            log.warning(
                "%s: the tokens enter this graph as input '%s' (a graph break before the blocks?) and no "
                "prefix token was found for them: none is protected. If the model has CLS or register "
                "tokens, pass protect=N to repshift_fx.backend().", ctx.model_name, name,
            )
            return


def _pruned_outputs(gm: torch.fx.GraphModule, ctx: PassContext, first: int) -> list[torch.fx.Node]:
    """Outputs that would carry pruned tokens out of the graph: the next graph and the Python code
    between them (a graph break) were captured for the full token count, or the model returns
    every token."""
    by_name = nodes_by_name(gm)
    block = ctx.analysis.blocks[first]
    tokens = shape(by_name[block.output])[1]
    return [node for node in _outputs_after(gm, block.output) if len(shape(node) or ()) == 3 and shape(node)[1] == tokens]


def _refuse_pruned_outputs(ctx: PassContext, first: int, node: torch.fx.Node) -> None:
    block = ctx.analysis.blocks[first]
    raise UnsupportedSiteError(
        f"an output of {ctx.model_name} ({value_phrase(node)}) {tuple(shape(node))} carries the tokens of block "
        f"{first + ctx.block_offset} ({block.module or '-'}) on, which a drop there would cut: either "
        "dynamo breaks the graph after that block (a print, .item(), data-dependent control flow), "
        "handing the tokens to Python code and to the next graph, or the model returns every token "
        "(a dense head). restore=True (or 'auto') puts every token back before it; or remove the graph break "
        "(torch._dynamo.explain(model)(x) lists them), or prune only at blocks after it.",
        node=node.name, needs_every_token=True,
    )


def _report(ctx: PassContext) -> Report:
    report = build_report(ctx)
    for row in report.blocks:
        row.index += ctx.block_offset
    report.config["at"] = tuple(i + ctx.block_offset for i in ctx.plan.at)
    log.info("%s: tokens entering blocks %d..%d: %s", ctx.model_name, ctx.block_offset,
             ctx.block_offset + len(report.blocks) - 1, report.tokens)
    return report


repshift_backend = RepShiftBackend(Config())
"""The entry point `repshift` in `torch_dynamo_backends`: torch.compile(model, backend="repshift")."""
