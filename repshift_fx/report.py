"""The report: what the pass found and did, one row per block, printable as a table."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tabulate import tabulate

_IMPL_NAMES = {
    "sdpa": "SDPA",
    "explicit -> sdpa": "explicit -> SDPA",
    "multihead_attention": "MultiheadAttention (fused inside)",
    "explicit": "explicit (kept)",
}


@dataclass
class BlockRow:
    index: int
    module: str
    mixer: str  # "attention" | "mixing" | "-"
    attention: str  # SDPA, explicit -> SDPA, MultiheadAttention, explicit (kept): why
    tokens_in: int
    tokens_out: int
    scored: bool  # a drop follows this block


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

    @property
    def tokens(self) -> list[int]:
        return [row.tokens_in for row in self.blocks]

    @property
    def flop_ratio(self) -> float | None:
        if self.gflops_before and self.gflops_after is not None:
            return self.gflops_after / self.gflops_before
        return None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["flop_ratio"] = self.flop_ratio
        return out

    def __str__(self) -> str:
        rows = [
            (r.index, r.module or "-", r.mixer, r.attention, r.tokens_in, r.tokens_out, "drop" if r.scored else "")
            for r in self.blocks
        ]
        table = tabulate(rows, headers=("block", "module", "mixer", "attention", "tokens in", "tokens out", ""))
        cfg = ", ".join(f"{k}={v}" for k, v in self.config.items())
        lines = [f"repshift_fx report for {self.model} ({cfg})", table, ""]
        lines.append(f"prefix tokens kept: {self.prefix} ({self.prefix_source})")
        if self.flop_ratio is not None:
            lines.append(
                f"GFLOPs per sample: {self.gflops_before:.3f} -> {self.gflops_after:.3f} "
                f"(ratio {self.flop_ratio:.3f})"
            )
        lines += self.notes
        return "\n".join(lines)


def attention_label(records) -> str:
    if not records:
        return "-"
    labels = []
    for rec in records:
        text = _IMPL_NAMES.get(rec.impl, rec.impl)
        labels.append(f"{text}: {rec.reason}" if rec.reason else text)
    return "; ".join(dict.fromkeys(labels))


def build_report(ctx, gflops_before=None, gflops_after=None) -> Report:
    analysis, plan = ctx.analysis, ctx.plan
    dropped = set(plan.at)
    rows = []
    for block in analysis.blocks:
        members = set(block.mlp.nodes) | (set(block.mixer.nodes) if block.mixer else set())
        records = [rec for rec in ctx.attention if rec.node in members]
        tokens_in = plan.tokens[block.index]
        tokens_out = next((d.prefix + d.keep for d in plan.drops if d.block == block.index), tokens_in)
        rows.append(
            BlockRow(block.index, block.module, block.mixer.kind if block.mixer else "-",
                     attention_label(records), tokens_in, tokens_out, block.index in dropped)
        )
    notes = list(ctx.notes)
    for site in analysis.stray:
        notes.append(f"residual site at '{site.module or site.add}' ({site.kind}) is not part of a block")
    config = {k: v for k, v in vars(plan.config).items()}
    config["at"] = plan.at
    return Report(ctx.model_name, config, rows, plan.prefix, analysis.prefix_source, gflops_before, gflops_after, notes)
