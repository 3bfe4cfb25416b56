"""Plan: turn the configuration and the analysis into a `PrunePlan` (which block drops how many).

    Config(keep, at, site, distance, ...) + Analysis(blocks, prefix) -> PrunePlan

`make_plan` places what it is told; plan/restores.py decides where tokens come back from what the
analysis found needs every token. The budget searches (`target_flops`) that choose `keep` run the
whole pipeline: plan/budget.py.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from repshift_fx.config import Config
from repshift_fx.errors import ConfigError, UnsupportedSiteError

log = logging.getLogger("repshift_fx")


@dataclass(frozen=True)
class Drop:
    """After block `block`, keep `prefix` + `keep` of the `prefix` + `before` tokens."""

    block: int
    after: str  # node whose output is gathered: the block's output
    score_inputs: tuple[str, ...]  # (changed, reference) for shift; (tokens,) for norm/random
    prefix: int
    before: int  # non-prefix tokens entering the drop
    keep: int  # non-prefix tokens kept, the protected ones included
    fused: int = 0  # 1 when fuse=True folds the dropped tokens into one more token after the kept ones
    # original positions of tokens kept in place among the others (ViM's middle class token), in the
    # numbering of the run's first block: the head reads them by position (Analysis.protected)
    protected: tuple[int, ...] = ()
    # an MLP-only drop (its stage needs every token between blocks: windowed attention, a grid conv):
    # the stream keeps every token, and the left-out ones skip only the MLPs of the stage's later
    # blocks (passes/mlp_only_drops.py); `before` and `keep` count the tokens those MLPs run on
    mlp_only: bool = False
    # score="tome" with shift_guidance: the (changed, reference) nodes of the shift of the block before,
    # over the tokens this block's matching sees; () where there is none (the first block of a run)
    guide: tuple[str, ...] = ()

    @property
    def out(self) -> int:
        """Tokens leaving the drop, prefix and fused token included."""
        return self.prefix + self.keep + self.fused


@dataclass
class PrunePlan:
    config: Config
    drops: list[Drop]
    tokens: list[int]  # tokens entering each block, prefix included
    prefix: int
    # (block, drops): after `block` every token is put back, undoing `drops` (passes/restore_tokens.py)
    restore_at: list[tuple[int, list[Drop]]] = field(default_factory=list)
    mlp_tokens: list[int] = field(default_factory=list)  # tokens each block's MLP runs on, prefix included
    restore_after: frozenset[int] = frozenset()  # blocks after which every token comes back: what follows needs them
    skipped: frozenset[int] = frozenset()  # blocks of `at` whose drop was left out: restoring would undo it at once
    notes: list[str] = field(default_factory=list)

    @property
    def at(self) -> tuple[int, ...]:
        return tuple(d.block for d in self.drops)

    def prunes(self, blocks) -> bool:
        """Some block, or its MLP, runs on fewer tokens than it was traced with."""
        counts = self.mlp_tokens or self.tokens
        return any(counts[b.index] < b.tokens for b in blocks)


def default_at(depth: int) -> tuple[int, ...]:
    """DeiT-S's 3.0 GFLOPs schedule, generalised: drop after blocks d/4, d/2 and 3d/4."""
    return tuple(sorted({depth // 4, depth // 2, 3 * depth // 4} - {depth - 1} - {-1}))


def kept_count(keep: float, n: int) -> int:
    """ceil(keep * n), robust to float noise (0.7 * 196 = 137.19999... -> 138)."""
    return max(1, min(n, math.ceil(round(keep * n, 9))))


MIXER_ONLY_SITE = "attn"  # where a block without an MLP (ViM's SSM blocks) is scored with site="mlp"


def site_of(block, config: Config) -> str:
    """The site a block is scored at: config.site, except that a block with no MLP sub-layer takes
    `MIXER_ONLY_SITE` for site="mlp" (docs/vim.md says why the mixer)."""
    return MIXER_ONLY_SITE if block.mlp is None and config.site == "mlp" else config.site


def _score_inputs(block, config: Config) -> tuple[str, ...]:
    return shift_inputs(block, config) if config.score == "shift" else (block.output,)


def shift_inputs(block, config: Config, residual: bool | None = None) -> tuple[str, ...]:
    """(changed, reference): the nodes whose distance is the block's shift at config.site
    (`residual`: the stream after the sub-layer against before it; default config.residual)."""
    site_name = site_of(block, config)
    if site_name == "block":
        return (block.output, block.input)
    site = block.mlp if site_name == "mlp" else block.mixer
    if site is None:
        raise UnsupportedSiteError(
            f"site='attn' needs an attention sub-layer in block {block.index} ({block.module}), "
            "but this block has only an MLP; use site='mlp' or site='block'", module=block.module
        )
    return (site.add if (config.residual if residual is None else residual) else site.branch, site.stream)


def check_at(at: tuple[int, ...], depth: int, first: str, kind: str = "blocks") -> None:
    """Refuse block indices outside 0..depth-1, saying how many blocks were found and where."""
    bad = [i for i in at if not 0 <= i < depth]
    if bad:
        raise ConfigError(
            f"at={at} names block(s) {bad}, but {depth} {kind} were found (0..{depth - 1}, first at {first})"
        )


def check_keep_chosen(config: Config) -> None:
    """A plan needs a keep rate: target_flops is turned into one by `plan_for_budget` first."""
    if config.keep is None:
        raise ConfigError(
            f"target_flops={config.target_flops} needs the FLOPs measured on the model: use "
            "repshift_fx.compress()/inspect(), which choose the keep rate, or pass keep="
        )


def runs(analysis) -> list[list]:
    """The blocks in runs over one token count: a stage of a hierarchical model (whose end pools
    or reshapes the tokens into the next stage's count), or every block of a plain one."""
    found = []
    for block in analysis.blocks:
        if found and found[-1][-1].tokens == block.tokens:
            found[-1].append(block)
        else:
            found.append([block])
    return found


def run_of(analysis, block: int) -> list:
    """The run (`runs`) that holds block `block`."""
    return next(run for run in runs(analysis) if any(b.index == block for b in run))


def tome_pairs(prefix: int, n: int) -> int:
    """The most tokens ToMe can merge away among prefix + n tokens: each leaving token of set A
    needs a token of set B to go into (A and B alternate after the prefix)."""
    a = len(range(prefix + prefix % 2, prefix + n, 2))
    b = len(range(prefix + 1 - prefix % 2, prefix + n, 2))
    return min(a, b) if b else 0


def _schedule(config: Config, at: tuple[int, ...]) -> dict[int, float | int]:
    amounts = config.r if config.score == "tome" else config.keep
    amounts = amounts if isinstance(amounts, tuple) else (amounts,) * len(at)
    if len(amounts) != len(at):
        what = "r has" if config.score == "tome" else "keep has"
        raise ConfigError(f"{what} {len(amounts)} entries for {len(at)} entries of at={at}")
    return dict(zip(at, amounts))


def _drop(block, amount, prefix: int, n: int, config: Config, protected: tuple[int, ...] = (), guide=()) -> Drop:
    if config.score == "tome":  # between attention and MLP, as ToMe merges
        if amount > tome_pairs(prefix, n):
            raise ConfigError(f"ToMe's r={amount} at block {block.index} ({block.module or '-'}) is more than half of "
                              f"the {n} tokens entering it: at most {tome_pairs(prefix, n)} can merge there")
        if protected:
            raise UnsupportedSiteError(
                f"score='tome' at block {block.index} ({block.module or '-'}): ToMe's matching may merge the "
                f"token(s) the model reads by position {list(protected)}; use score='shift' (with reduce='merge' "
                "to merge), which keeps them in place", module=block.module)
        return Drop(block.index, block.mlp.stream if block.mlp else block.output, (), prefix, n, n - amount, guide=guide)
    keep = kept_count(amount, n - len(protected)) + len(protected)
    fused = int(config.fuse and keep < n)  # fuse=True: the dropped tokens become one token
    return Drop(block.index, block.output, _score_inputs(block, config), prefix, n, keep, fused, protected)


def _check_stage(run, drops: list[Drop]) -> None:
    first = run[0]
    raise UnsupportedSiteError(
        f"block {first.index} ({first.module or '-'}) starts a stage of {first.tokens} tokens: the stage before it "
        f"pools or reshapes its tokens into a grid, which needs all of them, but block(s) "
        f"{[d.block for d in drops]} drop some earlier. Put them back before the stage ends with restore=True "
        f"(or 'auto'), or drop only from block {first.index} on (at=...).", module=first.module
    )


def tome_blocks(analysis, prefix: int) -> tuple[int, ...]:
    """ToMe's blocks by default: every block with two tokens to match (not an attention-pool head's
    one query)."""
    return tuple(b.index for b in analysis.blocks if tome_pairs(prefix, b.tokens) > 0)


def make_plan(analysis, config: Config, restore_after=frozenset(), mlp_only=frozenset()) -> PrunePlan:
    """The drops of `at`, and where every token is restored: after the last block of a run (of
    blocks over one token count) that holds a drop, when another run follows or restore=True,
    and after each block of `restore_after` (restore="auto": before what needs every token).
    The drops of a run that holds a block of `mlp_only` are MLP-only (`Drop.mlp_only`): the
    stream keeps every token there, so nothing is restored."""
    if config.score != "tome":
        check_keep_chosen(config)
    depth = len(analysis.blocks)
    prefix = analysis.prefix if config.protect == "auto" else int(config.protect)
    at = config.at if config.at is not None else \
        tome_blocks(analysis, prefix) if config.score == "tome" else default_at(depth)
    if not at:  # one block: a drop after it leaves no block to run on fewer tokens
        raise ConfigError(f"the model has 1 token block (attention or MLP over (B, N, C) tokens: "
                          f"'{analysis.blocks[0].module or '-'}'), and a drop after it would leave no block running "
                          "on fewer tokens; the rest of the model works on other shapes (a grid): prune those rows "
                          "and columns with mode='lines', or choose a model with more token blocks")
    check_at(at, depth, analysis.blocks[0].module or "the root")
    schedule = _schedule(config, at)
    # read by position after the last block: kept in place whatever `protect` says, or the read goes wrong
    protected = tuple(p for p in getattr(analysis, "protected", {}) if p >= prefix)
    if prefix >= analysis.blocks[0].tokens:
        given = f"protect={prefix}" if config.protect != "auto" else \
            f"the {prefix} prefix token(s) found ({analysis.prefix_source}), which are never pruned,"
        raise ConfigError(f"{given} leave(s) no token to prune of the {analysis.blocks[0].tokens} entering the first "
                          "block: give a longer input (more patches or words), or a smaller protect=")

    plan = PrunePlan(config, [], [], prefix)
    stages = runs(analysis)
    for k, run in enumerate(stages):
        if any(b.index in mlp_only for b in run):
            _plan_mlp_only_run(plan, run, schedule)
            continue
        _plan_run(plan, run, schedule, config, protected if run is stages[-1] else (), restore_after,
                  last=k == len(stages) - 1)
    return plan


def _plan_run(plan: PrunePlan, run, schedule, config: Config, held, restore_after, last: bool) -> None:
    """The drops of one run of blocks over one token count; every token restored after the run
    (when another follows, or restore=True) and after each block of `restore_after`."""
    prefix, pending = plan.prefix, []
    unrestored = _pending_before(plan) if config.restore is False else []
    if unrestored:
        _check_stage(run, unrestored)
    n, previous = run[0].tokens - prefix, None
    for block in run:
        plan.tokens.append(prefix + n)
        plan.mlp_tokens.append(prefix + n)
        if block.index in schedule:
            guide = _guide(previous, config, plan.mlp_tokens[-2] == prefix + n if previous else False)
            drop = _drop(block, schedule[block.index], prefix, n, config, held, guide)
            plan.drops.append(drop)
            pending.append(drop)
            n = drop.keep + drop.fused
            if config.score == "tome":  # ToMe merges between the attention and the MLP of its block
                plan.mlp_tokens[-1] = prefix + n
        run_ends = block is run[-1] and (config.restore is True or (config.restore == "auto" and not last))
        previous = block
        if pending and (run_ends or block.index in restore_after):
            plan.restore_at.append((block.index, pending))
            pending, n, previous = [], run[0].tokens - prefix, None


def _guide(previous, config: Config, same_tokens: bool) -> tuple[str, ...]:
    """ToMe's shift guidance: the shift of the block before, whose MLP ran on the tokens this
    block's matching sees; none for the first block of a run or after a restore. Always the
    residual form, D(x' + MLP(LN(x')), x'), how far the block moved each token: the paper's
    D(MLP(LN(x')), x') is close to the token's norm where the branch is small next to the stream
    (layer scale), which measured worse inside the matching (docs/results/real_vit.md)."""
    if config.score != "tome" or not config.shift_guidance or previous is None or not same_tokens:
        return ()
    return shift_inputs(previous, config, residual=True)


def _pending_before(plan: PrunePlan) -> list[Drop]:
    """The drops of earlier runs that no restore undid (restore=False: the next run cannot start)."""
    undone = {d.block for _, drops in plan.restore_at for d in drops}
    return [d for d in plan.drops if d.block not in undone and not d.mlp_only]


def _plan_mlp_only_run(plan: PrunePlan, run, schedule) -> None:
    """A run whose blocks need every token between their MLPs: each drop chooses the tokens the MLPs
    of the later blocks run on; the stream, and every other part of the blocks, keeps them all."""
    prefix, config = plan.prefix, plan.config
    n = run[0].tokens - prefix
    for block in run:
        plan.tokens.append(block.tokens)
        plan.mlp_tokens.append(prefix + n)
        if block.index in schedule:
            keep = kept_count(schedule[block.index], n)
            plan.drops.append(Drop(block.index, block.output, _score_inputs(block, config), prefix, n, keep,
                                   mlp_only=True))
            n = keep
