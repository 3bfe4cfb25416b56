"""What the passes share: the run's context, and the typed record each inserted node carries.

    ctx = PassContext(config=config, args=args)
    mark(node, "keep", block=3)           # node.meta["repshift"] = Inserted("keep", 3)
    inserted(node)                        # the record, or None for the model's own nodes
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx

from repshift_fx.config import Config

META_KEY = "repshift"
ROLES = ("score", "index", "keep", "side", "metric", "match", "merge", "size", "bias", "restore", "pinned", "origin", "protect",
         "mlp_keep", "mlp_restore")


@dataclass(frozen=True)
class Inserted:
    """What an inserted node is: its `role`, the drop's `block`, and for a gathered side tensor the
    `source` it was gathered from."""

    role: str
    block: int | None = None
    mode: str = "tokens"
    source: str | None = None


def mark(node: torch.fx.Node, role: str, block: int | None = None, **fields) -> torch.fx.Node:
    node.meta[META_KEY] = Inserted(role, block, **fields)
    return node


def inserted(node: torch.fx.Node) -> Inserted | None:
    return node.meta.get(META_KEY)


def role_of(node: torch.fx.Node) -> str | None:
    record = inserted(node)
    return record.role if record is not None else None


@dataclass
class PassContext:
    """What the passes share: the config, the example args, and what earlier passes found.
    Every field a pass reads or writes is declared here."""

    config: Config
    args: tuple
    model_name: str = "model"
    weight_placeholders: frozenset[str] = frozenset()  # dynamo lifts parameters to placeholders
    prefix_hints: dict = field(default_factory=dict)  # placeholder -> (prefix, source), from an earlier dynamo graph
    block_offset: int = 0  # the model's number of this graph's first block (dynamo graph breaks)
    mode: Any = None  # the repshift_fx.modes.Mode whose analysis ran
    analysis: Any = None  # the mode's analysis: passes.find_sites.Analysis | passes.find_lines.LineAnalysis
    plan: Any = None  # the mode's plan: plan.tokens.PrunePlan | plan.lines.LinePlan
    output_shapes: list = field(default_factory=list)  # the graph's output shapes before any rewrite (verify)
    attention: list = field(default_factory=list)  # passes.attention_to_sdpa.AttentionRecord
    importance: dict[int, str] = field(default_factory=dict)  # score="attention": block -> importance node
    side_gathers: list = field(default_factory=list)  # passes.gather_side_tensors: what each drop gathered
    notes: list[str] = field(default_factory=list)
    restore_after: frozenset[int] = frozenset()  # restore="auto": blocks after which every token comes back
    skipped_drops: frozenset[int] = frozenset()  # restore="auto": drops left out (what followed needed every token)
    mlp_only: frozenset[int] = frozenset()  # restore="auto": blocks whose run drops tokens from its MLPs only
