"""What the passes share: the run's context, and the typed record each inserted node carries.

    ctx = PassContext(config=config, args=args)    # PassContext[Analysis, PrunePlan] in tokens mode
    mark(node, Role.KEEP, block=3)                 # node.meta["repshift"] = Inserted(Role.KEEP, 3)
    inserted(node)                                 # the record, or None for the model's own nodes
    find_inserted(gm, Role.MATCH, block=3)         # the node a pass inserted with that role for that block
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import torch.fx

from repshift_fx.config import Config

META_KEY = "repshift"


class Role(str, enum.Enum):
    """What an inserted node does (a str: `Role.KEEP == "keep"`)."""

    SCORE = "score"  # a score per token
    GUIDE = "guide"  # ToMe's shift guidance: the block before's shift
    INDEX = "index"  # the indices kept
    KEEP = "keep"  # the kept (gathered, merged or fused) tokens: the stream after the drop
    PINNED = "pinned"  # tokens held in place for a read by position
    ORIGIN = "origin"  # each kept token's original position
    METRIC = "metric"  # ToMe's similarity metric
    MATCH = "match"  # ToMe's bipartite matching
    ASSIGN = "assign"  # where each dropped token merges
    MERGE = "merge"  # the merge itself
    SIZE = "size"  # how many tokens each kept token stands for
    BIAS = "bias"  # proportional attention's log-size bias
    SIDE = "side"  # a side tensor gathered with the stream
    RESTORE = "restore"  # every token put back
    PROTECT = "protect"  # a read by position rewritten to follow its token
    MLP_KEEP = "mlp_keep"  # the tokens an MLP-only drop's MLPs run on
    MLP_RESTORE = "mlp_restore"  # the MLP's output scattered back


@dataclass(frozen=True)
class Inserted:
    """What an inserted node is: its `role`, the drop's `block`, and for a gathered side tensor the
    `source` it was gathered from."""

    role: Role
    block: int | None = None
    mode: str = "tokens"
    source: str | None = None


def mark(node: torch.fx.Node, role: Role | str, block: int | None = None, **fields) -> torch.fx.Node:
    node.meta[META_KEY] = Inserted(Role(role), block, **fields)
    return node


def inserted(node: torch.fx.Node) -> Inserted | None:
    return node.meta.get(META_KEY)


def role_of(node: torch.fx.Node) -> Role | None:
    record = inserted(node)
    return record.role if record is not None else None


def find_inserted(gm: torch.fx.GraphModule, role: Role | str, block: int | None = None) -> torch.fx.Node | None:
    """The node inserted with `role` for the drop after `block` (the first, in graph order); None if none."""
    role = Role(role)
    return next((n for n in gm.graph.nodes if (r := inserted(n)) is not None and r.role is role and r.block == block),
                None)


class ModeSteps(Protocol):
    """What the passes read of the mode that runs them (repshift_fx.modes.Mode)."""

    name: str
    rewrite_passes: tuple


AnalysisT = TypeVar("AnalysisT")  # passes.find_sites.Analysis | passes.find_lines.LineAnalysis
PlanT = TypeVar("PlanT")  # plan.tokens.PrunePlan | plan.lines.LinePlan


@dataclass
class TokenRecords:
    """What the tokens-mode passes record for the later ones and the report."""

    attention: list = field(default_factory=list)  # passes.attention_to_sdpa.AttentionRecord
    importance: dict[int, str] = field(default_factory=dict)  # score="attention": block -> importance node
    side_gathers: list = field(default_factory=list)  # passes.gather_side_tensors: what each drop gathered


@dataclass
class PassContext(Generic[AnalysisT, PlanT]):
    """What the passes share: the config, the example args, and what earlier passes found.
    Every field a pass reads or writes is declared here; a mode's analysis and plan types it."""

    config: Config
    args: tuple
    model_name: str = "model"
    weight_placeholders: frozenset[str] = frozenset()  # dynamo lifts parameters to placeholders
    prefix_hints: dict[str, tuple[int, str]] = field(default_factory=dict)  # placeholder -> (prefix, source), from an earlier dynamo graph
    block_offset: int = 0  # the model's number of this graph's first block (dynamo graph breaks)
    mode: ModeSteps | None = None  # the mode whose analysis ran
    analysis: AnalysisT | None = None
    plan: PlanT | None = None
    output_shapes: list[tuple[str, tuple | None]] = field(default_factory=list)  # output shapes before any rewrite (verify)
    tokens: TokenRecords = field(default_factory=TokenRecords)  # tokens mode only
    notes: list[str] = field(default_factory=list)
