"""The report: what the pass found and did, one row per block, as a table, as data, as a graph.

    print(report)              # tabulate table + summary
    report.to_dict()           # stable keys (docs/cli.md), ready for json.dumps
    report.to_dot()            # DOT text: the rewritten graph, drops and pruned blocks highlighted
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import networkx as nx
from tabulate import tabulate

from repshift_fx.context import inserted, role_of
from repshift_fx.errors import ConfigError
from repshift_fx.flops import FlopBreakdown, before_and_after, block_of_nodes
from repshift_fx.fx.nodes import carries_tensor, input_name, module_phrase, nodes_by_name, op_name, shape, value_phrase
from repshift_fx.plan.tokens import runs

log = logging.getLogger("repshift_fx")

SCHEMA = "repshift-fx/report/1"

_IMPL_NAMES = {
    "sdpa": "SDPA",
    "explicit -> sdpa": "explicit -> SDPA",
    "multihead_attention": "MultiheadAttention (fused inside)",
    "explicit": "explicit (kept)",
}
_MIXERS = {"attention": "attention + MLP", "ssm": "SSM + MLP", "mixing": "token-mixing + MLP", "-": "MLP"}
_MIXERS_ALONE = {"attention": "attention", "ssm": "SSM", "mixing": "token-mixing"}  # no MLP after the mixer
_BLOCK_KEYS = ("index", "module", "site", "mixer", "attention", "tokens_in", "tokens_out", "scored",
               "gflops_before", "gflops_after", "refused", "reduce", "restored", "mlp_tokens")


@dataclass
class BlockRow:
    index: int
    module: str
    mixer: str  # "attention" | "ssm" | "mixing" | "-"
    attention: str  # SDPA, explicit -> SDPA, MultiheadAttention, explicit (kept): why
    tokens_in: int
    tokens_out: int
    scored: bool  # a drop follows this block
    site: str = ""  # "attention + MLP", "token-mixing + MLP (why)", "MLP", "SSM" (no MLP), "SSM + MLP"
    gflops_before: float | None = None  # GMACs per sample of the block's nodes
    gflops_after: float | None = None
    # why no drop may come before this block ("" when it may): the side tensors a block reads (rotary
    # tables, masks, biases) are gathered (passes/gather_side_tensors.py), so only what the passes
    # refuse is marked, by `repshift_fx.pipeline.refused_report`
    refused: str = ""
    reduce: str = ""  # what its drop does: "drop", "merge", "ToMe r=8" ("" without one)
    restored: bool = False  # every token is put back after this block
    mlp_tokens: int | None = None  # the tokens its MLP runs on, where fewer than the block's (MLP-only drops)


@dataclass
class Report:
    model: str
    config: dict
    blocks: list[BlockRow]
    prefix: int
    prefix_source: str
    gflops_before: float | None = None
    gflops_after: float | None = None
    notes: list[str] = field(default_factory=list)
    gflops_outside_before: float | None = None  # patch embedding, head, ...: not in any block
    gflops_outside_after: float | None = None
    side_tensors: list[str] = field(default_factory=list)  # gathered with the stream's indices
    refused: list[str] = field(default_factory=list)
    budget: dict | None = None  # plan.BudgetResult as a dict, when target_flops chose keep
    graph: Any = field(default=None, repr=False, compare=False)  # nx.DiGraph for to_dot()
    mode: ClassVar[str] = "tokens"  # which pipeline made it; `report_lines.LineReport`: "lines"
    shown_config: ClassVar[tuple[str, ...] | None] = None  # config keys in the title; None: every one set

    @property
    def tokens(self) -> list[int]:
        return [row.tokens_in for row in self.blocks]

    @property
    def flop_ratio(self) -> float | None:
        if self.gflops_before and self.gflops_after is not None:
            return self.gflops_after / self.gflops_before
        return None

    def to_dict(self) -> dict:
        """Plain data with stable keys (documented in docs/cli.md); tuples stay tuples."""
        return {
            "schema": SCHEMA,
            "model": self.model,
            "config": dict(self.config),
            "blocks": [{key: getattr(row, key) for key in _BLOCK_KEYS} for row in self.blocks],
            "prefix": self.prefix,
            "prefix_source": self.prefix_source,
            "gflops_before": self.gflops_before,
            "gflops_after": self.gflops_after,
            "flop_ratio": self.flop_ratio,
            "gflops_outside_before": self.gflops_outside_before,
            "gflops_outside_after": self.gflops_outside_after,
            "side_tensors": list(self.side_tensors),
            "refused": list(self.refused),
            "budget": dict(self.budget) if self.budget else None,
            "notes": list(self.notes),
        }

    def to_dot(self) -> str:
        """The rewritten graph in DOT (see `dot_graph`); needs the report of a rewrite."""
        if self.graph is None:
            raise ConfigError("this report has no graph (the dynamo backend's reports keep none); build it with "
                              "repshift_fx.inspect(model, x, ...) for the DOT graph")
        return to_dot(self.graph)

    def table(self, fmt: str = "simple") -> str:
        rows = [
            (r.index, r.module or "-", r.site + (" [refused]" if r.refused else ""), r.attention,
             r.tokens_in if r.mlp_tokens is None else f"{r.tokens_in} (MLP {r.mlp_tokens})", r.tokens_out,
             gflops_text(r.gflops_before), gflops_text(r.gflops_after),
             " + ".join(x for x in (r.reduce, "restore" if r.restored else "") if x))
            for r in self.blocks
        ]
        headers = ("block", "module", "site", "attention", "tokens in", "tokens out", "GFLOPs before",
                   "GFLOPs after", "")
        return tabulate(rows, headers=headers, tablefmt=fmt, disable_numparse=True)

    def summary(self) -> list[str]:
        lines = self._summary_head()
        if self.flop_ratio is not None:
            lines.append(
                f"GFLOPs per sample: {gflops_text(self.gflops_before)} -> {gflops_text(self.gflops_after)} "
                f"(ratio {self.flop_ratio:.3f}); outside the blocks {gflops_text(self.gflops_outside_before)} -> "
                f"{gflops_text(self.gflops_outside_after)}"
            )
        if self.budget:
            lines.append(self._budget_line())
        lines += self._side_lines()
        lines.append("refused: nothing" if not self.refused else "refused:")
        lines += [f"  - {item}" for item in self.refused]
        return lines + self.notes

    def _summary_head(self) -> list[str]:
        """The summary's first lines (`LineReport`: its stage table instead of the prefix)."""
        return [f"prefix tokens kept: {self.prefix} ({self.prefix_source})"]

    def _budget_line(self) -> str:
        b = self.budget
        amount = f"ToMe r={b['r']}" if b.get("r") is not None else f"keep={b['keep']:.4f}"
        return (f"FLOP budget {b['target']}: reached ratio {b['reached']:.4f} with {amount} "
                f"at {tuple(b['at'])} (kept {', '.join(map(str, b['kept']))} tokens)")

    def _side_lines(self) -> list[str]:
        return [f"side tensors gathered: {', '.join(self.side_tensors) or 'none'}"]

    def __str__(self) -> str:
        keys = self.config if self.shown_config is None else self.shown_config
        cfg = ", ".join(f"{k}={self.config[k]}" for k in keys if self.config.get(k) is not None)
        return "\n".join([f"repshift_fx report for {self.model} ({cfg})", self.table(), "", *self.summary()])


def gflops_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def attention_label(records) -> str:
    if not records:
        return "-"
    labels = []
    for rec in records:
        text = _IMPL_NAMES.get(rec.impl, rec.impl)
        labels.append(f"{text}: {rec.reason}" if rec.reason else text)
    return "; ".join(dict.fromkeys(labels))


def site_label(block) -> str:
    if block.mlp is None:
        return _MIXERS_ALONE[block.mixer.kind]
    label = _MIXERS[block.mixer.kind if block.mixer else "-"]
    if block.mixer is not None and block.mixer.kind == "mixing" and block.mixer.reason:
        label += f" ({block.mixer.reason})"
    return label


def _as_breakdown(value) -> tuple[float | None, list | None, float | None]:
    if isinstance(value, FlopBreakdown):
        return value.total, value.blocks, value.outside
    return value, None, None


def _nothing_pruned(ctx) -> list[str]:
    """A warning when pruning was asked for but no block runs on fewer tokens (a drop after the
    last block, blocks that hold only prefix tokens): never a silent no-op."""
    plan, blocks, config = ctx.plan, ctx.analysis.blocks, ctx.plan.config
    rates = config.keep if isinstance(config.keep, tuple) else (config.keep,)
    asked = any(isinstance(k, float) and k < 1 for k in rates) or bool(config.r)
    if not asked or plan.prunes(blocks):
        return []
    if all(b.tokens <= plan.prefix + 1 for b in blocks):  # a drop keeps at least one token
        why = (f"the {len(blocks)} block(s) found run on {max(b.tokens for b in blocks)} token(s) each, nothing to "
               "drop; the model's other blocks are no (B, N, C) token blocks (they work on a grid, for instance)")
    else:
        why = (f"the drops after block(s) {list(plan.at)} leave no later block running on fewer tokens (the model "
               f"has {len(blocks)} blocks, 0..{len(blocks) - 1}); {_untried_at(ctx)}")
    log.warning("%s: nothing is pruned: %s", ctx.model_name, why)
    return [f"nothing is pruned: {why}"]


def _untried_at(ctx) -> str:
    """Blocks not tried yet that a later block of the same stage follows (where a drop can save)."""
    tried = set(ctx.plan.at) | set(ctx.plan.skipped) | set(ctx.plan.restore_after)
    stages = runs(ctx.analysis)
    untried = tuple(b.index for run in stages for b in run[:-1] if b.index not in tried)
    if untried:
        return f"drop where a later block of the stage follows, e.g. at={untried[:3]}"
    if len(stages) > 1:
        return ("no stage has a block left whose drop a later block of the stage would run on: the stages are too "
                "short here; prune in lines mode (mode='lines'), or a deeper variant of the model")
    return "drop earlier, e.g. at=(0,)"


def reduce_label(plan, block: int) -> str:
    drop = next((d for d in plan.drops if d.block == block), None)
    if drop is None:
        return ""
    if plan.config.score == "tome":
        return f"ToMe r={drop.before - drop.keep}"
    if drop.mlp_only:
        return f"drop for the MLPs after ({drop.prefix + drop.keep} of {drop.prefix + drop.before})"
    return plan.config.reduce


def sized(plan, block: int) -> bool:
    """Whether the block's attention weighs keys by their sizes: a merge came before it (and no
    restore since)."""
    if plan.config.reduce != "merge" and plan.config.score != "tome":
        return False
    merged = [d.block for d in plan.drops if d.block < block]
    restored = [end for end, _ in plan.restore_at if end < block]
    return bool(merged) and (not restored or max(merged) > max(restored))


def build_report(ctx, gflops_before=None, gflops_after=None, *, gm=None, budget=None) -> Report:
    """The report of one rewrite. gflops_*: a float (whole model) or a `flops.FlopBreakdown`
    (per block too); `gm`: the rewritten graph, for `side_tensors` and `to_dot`; `budget`: the
    `plan.BudgetResult` when target_flops chose the keep rate."""
    analysis, plan = ctx.analysis, ctx.plan
    before, blocks_before, outside_before = _as_breakdown(gflops_before)
    after, blocks_after, outside_after = _as_breakdown(gflops_after)
    dropped, restored = set(plan.at), {end for end, _ in plan.restore_at}
    rows = []
    for block in analysis.blocks:
        members = set().union(*(site.nodes for site in (block.mlp, block.mixer) if site is not None))
        records = [rec for rec in ctx.tokens.attention if rec.node in members]
        tokens_in = plan.tokens[block.index]
        tokens_out = next((d.out for d in plan.drops if d.block == block.index and not d.mlp_only), tokens_in)
        row = BlockRow(block.index, block.module, block.mixer.kind if block.mixer else "-", attention_label(records),
                       tokens_in, tokens_out, block.index in dropped, site_label(block),
                       blocks_before[block.index] if blocks_before else None,
                       blocks_after[block.index] if blocks_after else None)
        row.reduce, row.restored = reduce_label(plan, block.index), block.index in restored
        if plan.mlp_tokens and plan.mlp_tokens[block.index] < tokens_in:
            row.mlp_tokens = plan.mlp_tokens[block.index]
        if sized(plan, block.index) and "SDPA" in row.attention:
            row.attention += " + log(size)"
        rows.append(row)
    notes = list(ctx.notes) + _nothing_pruned(ctx)
    if analysis.protected and plan.drops:
        notes.append(f"kept in place at every drop: {analysis.protected_source}")
    refused = []
    for site in analysis.stray:
        refused.append(f"a residual {site.kind} branch in {module_phrase(site.module)} is not part of a block")
    for rec in ctx.tokens.attention:
        if rec.impl == "explicit":
            refused.append(f"attention in {module_phrase(rec.module)} kept explicit (not SDPA): {rec.reason}")
    config = {k: v for k, v in vars(plan.config).items()}
    config["at"] = plan.at
    if budget is not None:
        config["target_flops"] = budget.target
    graph = dot_graph(gm, analysis, plan) if gm is not None else None
    return Report(ctx.model_name, config, rows, plan.prefix, analysis.prefix_source, before, after, notes,
                  outside_before, outside_after, side_tensors(gm, plan, ctx.args) if gm is not None else [], refused,
                  dataclasses.asdict(budget) if budget is not None else None, graph)


def token_report(model, gm, ctx, flops: bool = True, budget=None) -> Report:
    """The report of one tokens-mode rewrite; with `flops`, GMACs per sample per block."""
    before = after = None
    if flops:
        before, after = before_and_after(model, gm, ctx)
    return build_report(ctx, before, after, gm=gm, budget=budget)


def side_tensors(gm, plan, args=()) -> list[str]:
    """Tensors other than the stream that a drop gathers with the same indices, as the user knows
    them: "input 'attention_mask'", "the result of mul in module 'encoder.layer.0.attention'"."""
    streams = {d.after for d in plan.drops}
    by_name, found, seen = nodes_by_name(gm), [], set()
    for node in gm.graph.nodes:
        role = role_of(node)
        source = node.args[0] if node.args else None
        if role not in (None, "mlp_keep") and op_name(node) == "gather_tokens" and getattr(source, "name", None) not in streams:
            name = source.name
        elif role == "side":
            name = inserted(node).source  # passes/gather_side_tensors.py
        else:
            continue
        if name in seen:
            continue
        seen.add(name)
        original = by_name.get(name)
        found.append(name if original is None else f"input '{input_name(gm, original, args)}'"
                     if original.op == "placeholder" else value_phrase(original, gm))
    return found


# --- DOT ---

ROLE_FILL = {"score": "#f4a261", "index": "#e76f51", "keep": "#e63946", "side": "#e9c46a"}
PRUNED_FILL = "#a8dadc"
_CLUSTER = {True: "#457b9d", False: "#bbbbbb"}


def dot_graph(gm, analysis, plan) -> nx.DiGraph:
    """The tensor data flow of the rewritten graph as a networkx DiGraph ready for DOT.

    Nodes: every tensor-valued fx node, labelled `name / op / shape`; the inserted scoring,
    top-k and gather nodes filled red-orange; the nodes of blocks that run on fewer tokens
    filled blue. `graph.graph["clusters"]` lists each block's nodes for `to_dot`."""
    owner = block_of_nodes(gm, analysis, known=None)
    full = plan.tokens[0] if plan.tokens else None
    graph = nx.DiGraph()
    graph.graph.update(graph={"rankdir": "TB", "fontname": "Helvetica"},
                       node={"shape": "box", "style": "filled", "fillcolor": "white", "fontsize": "10"},
                       edge={"arrowsize": "0.6"})
    keep = {n.name for n in gm.graph.nodes if n.op in ("placeholder", "output") or carries_tensor(n)}
    for node in gm.graph.nodes:
        if node.name not in keep:
            continue
        attrs = {"label": f"{node.name}\\n{op_name(node, gm)} {tuple(shape(node) or ())}"}
        role = role_of(node)
        block = owner.get(node.name)
        if role:
            attrs.update(fillcolor=ROLE_FILL.get(role, ROLE_FILL["side"]), fontcolor="white" if role == "keep" else "black")
        elif block is not None and plan.tokens[block] != full:
            attrs["fillcolor"] = PRUNED_FILL
        graph.add_node(node.name, **attrs)
        for arg in node.all_input_nodes:
            if arg.name in keep:
                graph.add_edge(arg.name, node.name)
    clusters = {}
    for name, block in owner.items():
        if block is not None and name in graph:
            clusters.setdefault(block, []).append(name)
    graph.graph["clusters"] = {
        block: {"nodes": names, "label": _cluster_label(analysis.blocks[block], plan),
                "pruned": plan.tokens[block] != full}
        for block, names in sorted(clusters.items())
    }
    return graph


def _cluster_label(block, plan) -> str:
    drop = next((d for d in plan.drops if d.block == block.index), None)
    text = f"block {block.index} ({block.module or '-'}): {plan.tokens[block.index]} tokens"
    return text + (f", keeps {drop.out}" if drop else "")


def to_dot(graph: nx.DiGraph) -> str:
    """DOT text by networkx + pydot (no Graphviz binary needed), with one cluster per block."""
    import pydot

    plain = graph.copy()
    clusters = plain.graph.pop("clusters", {})
    dot = nx.nx_pydot.to_pydot(plain)
    for block, info in clusters.items():
        cluster = pydot.Cluster(f"block_{block}", label=f'"{info["label"]}"', style="rounded",
                                color=_CLUSTER[info["pruned"]], fontsize="11")
        for name in info["nodes"]:
            for node in dot.get_node(name) or dot.get_node(f'"{name}"'):
                dot.del_node(node.get_name())
                cluster.add_node(node)
        dot.add_subgraph(cluster)
    return dot.to_string()
