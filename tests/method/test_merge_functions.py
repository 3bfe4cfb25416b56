"""repshift_fx.method.merge against brute-force references written here with Python loops."""
import math

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from repshift_fx.method.merge import (
    assign_to_kept,
    bipartite_soft_matching,
    merge_tokens,
    proportional_attention,
    restore_dropped,
    size_bias,
    size_weighted_mean,
    size_weighted_sum,
    unmerge,
)
from repshift_fx.plan.tokens import tome_pairs

torch.set_num_threads(1)


# ---------- brute-force references ----------

def cosine(u, v):
    return float(u @ v) / max(float(u.norm()) * float(v.norm()), 1e-12)


def ref_assign(metric, kept_index, prefix, valid=None):
    """Loops: kept -> own position; leaving -> most similar kept real non-prefix token, else K."""
    batch, n, _ = metric.shape
    k = kept_index.shape[1]
    out = torch.empty(batch, n, dtype=torch.long)
    for b in range(batch):
        kept = kept_index[b].tolist()
        for i in range(n):
            if i in kept:
                out[b, i] = kept.index(i)
                continue
            real = valid is None or bool(valid[b, i])
            best, target = -math.inf, k
            for j in range(prefix, k):
                if not real or (valid is not None and not valid[b, kept[j]]):
                    continue
                s = cosine(metric[b, i], metric[b, kept[j]])
                if s > best:
                    best, target = s, j
            out[b, i] = target
    return out


def ref_merge(x, size, assignment, k):
    batch, n, c = x.shape
    merged = torch.zeros(batch, k, c, dtype=torch.float64)
    total = torch.zeros(batch, k, dtype=torch.float64)
    for b in range(batch):
        for i in range(n):
            j = int(assignment[b, i])
            if j < k:
                merged[b, j] += float(size[b, i]) * x[b, i].double()
                total[b, j] += float(size[b, i])
    return merged / total[..., None], total


def ref_bipartite(metric, r, prefix):
    """ToMe's rule by loops: A = even non-prefix positions, B = odd ones."""
    batch, n, _ = metric.shape
    kept_all, assign_all = [], []
    for b in range(batch):
        a_pos = [i for i in range(prefix, n) if i % 2 == 0]
        b_pos = [i for i in range(prefix, n) if i % 2 == 1]
        edges = []
        for i in a_pos:
            sims = [cosine(metric[b, i], metric[b, j]) for j in b_pos]
            best = max(range(len(b_pos)), key=lambda t: sims[t])
            edges.append((sims[best], i, b_pos[best]))
        edges.sort(key=lambda e: -e[0])
        partner = {i: j for _, i, j in edges[:r]}
        kept = [i for i in range(n) if i not in partner]
        kept_all.append(kept)
        assign_all.append([kept.index(partner.get(i, i)) for i in range(n)])
    return torch.tensor(kept_all), torch.tensor(assign_all)


def tome_merge_wavg(x, metric, r, class_token, distill_token):
    """ToMe's own code (merge.py: bipartite_soft_matching + merge_wavg), in its concat order."""
    t = metric.shape[1]
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[..., 0, :] = -math.inf
    if distill_token:
        scores[..., :, 0] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    if class_token:
        unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="sum")
        if distill_token:
            return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
        return torch.cat([unm, dst], dim=1)

    size = torch.ones_like(x[..., 0, None])
    merged, size = merge(x * size), merge(size)
    assert t - r == merged.shape[1]
    return merged / size, size[..., 0]


def explicit_attention(q, k, v, size, scale):
    logits = (q.double() @ k.double().transpose(-1, -2)) * scale + size.double().log()[:, None, None, :]
    return (logits.softmax(-1) @ v.double()).float()


def random_kept(batch, n, k, prefix, seed):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        rest = (torch.randperm(n - prefix, generator=g)[: k - prefix] + prefix).tolist()
        rows.append(sorted(list(range(prefix)) + rest))
    return torch.tensor(rows)


# ---------- assignment ----------

@pytest.mark.parametrize("prefix", [0, 1, 2])
@pytest.mark.parametrize("padded", [False, True])
def test_assign_to_kept_matches_loops(prefix, padded):
    torch.manual_seed(prefix)
    metric = torch.randn(3, 13, 5)
    kept_index = random_kept(3, 13, 7, prefix, seed=prefix)
    valid = None
    if padded:
        valid = torch.ones(3, 13, dtype=torch.bool)
        valid[0, 9:] = False
        valid[1, ::3] = False
        valid[1, :prefix] = True
    got = assign_to_kept(metric, kept_index, prefix, valid)
    assert got.dtype == torch.long and got.shape == (3, 13)
    assert torch.equal(got, ref_assign(metric, kept_index, prefix, valid))
    for b in range(3):
        assert torch.equal(got[b, kept_index[b]], torch.arange(7))


def test_assign_padding_rules():
    metric = torch.randn(1, 6, 4)
    kept_index = torch.tensor([[0, 2, 4]])
    valid = torch.tensor([[True, True, False, True, True, False]])
    a = assign_to_kept(metric, kept_index, 1, valid)
    assert a[0, 5] == 3 and a[0, 1] == 2 and a[0, 3] == 2
    valid = torch.tensor([[True, True, False, True, False, True]])
    assert assign_to_kept(metric, kept_index, 1, valid)[0].tolist() == [0, 3, 1, 3, 2, 3]


# ---------- merging ----------

@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_merge_tokens_matches_loops(prefix):
    torch.manual_seed(10 + prefix)
    x, metric = torch.randn(2, 11, 6), torch.randn(2, 11, 6)
    size = torch.randint(1, 5, (2, 11)).float()
    valid = torch.ones(2, 11, dtype=torch.bool)
    valid[1, 8:] = False
    kept_index = random_kept(2, 11, 6, prefix, seed=3)
    assignment = assign_to_kept(metric, kept_index, prefix, valid)
    merged, merged_size = merge_tokens(x, size, assignment, 6)
    want, want_size = ref_merge(x, size, assignment, 6)
    assert merged.shape == (2, 6, 6) and merged_size.dtype == size.dtype
    torch.testing.assert_close(merged.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged_size.double(), want_size)
    for b in range(2):
        for p in range(prefix):
            torch.testing.assert_close(merged[b, p], x[b, p])


def test_integer_sizes():
    x = torch.randn(1, 4, 3)
    merged, merged_size = merge_tokens(x, torch.tensor([[1, 2, 1, 1]]), torch.tensor([[0, 1, 1, 2]]), 2)
    assert merged_size.tolist() == [[1, 3]]
    torch.testing.assert_close(merged[0, 1], (2 * x[0, 1] + x[0, 2]) / 3)


def test_two_merges_equal_mean_over_original_tokens():
    torch.manual_seed(1)
    x = torch.randn(2, 17, 8)
    size = torch.ones(2, 17)
    kept1 = random_kept(2, 17, 11, 1, seed=5)
    a1 = assign_to_kept(x, kept1, 1)
    x1, s1 = merge_tokens(x, size, a1, 11)
    kept2 = random_kept(2, 11, 6, 1, seed=6)
    a2 = assign_to_kept(x1 + 0.1 * torch.randn_like(x1), kept2, 1)
    x2, s2 = merge_tokens(x1, s1, a2, 6)
    for b in range(2):
        for j in range(6):
            members = [i for i in range(17) if int(a2[b, a1[b, i]]) == j]
            assert float(s2[b, j]) == len(members)
            torch.testing.assert_close(x2[b, j], x[b, members].mean(0), rtol=1e-5, atol=1e-6)
    assert torch.equal(s2.sum(1), torch.full((2,), 17.0))


# ---------- restoring ----------

def test_unmerge_and_restore_dropped():
    torch.manual_seed(2)
    y = torch.randn(2, 4, 3)
    assignment = torch.tensor([[0, 1, 1, 4, 2, 3], [0, 2, 1, 3, 3, 4]])
    got = unmerge(y, assignment)
    assert got.shape == (2, 6, 3)
    for b in range(2):
        for i in range(6):
            j = int(assignment[b, i])
            torch.testing.assert_close(got[b, i], y[b, j] if j < 4 else torch.zeros(3), rtol=0, atol=0)
    before = torch.randn(2, 6, 3)
    kept_index = torch.tensor([[0, 1, 3, 5], [0, 2, 3, 4]])
    restored = restore_dropped(y, kept_index, before)
    assert restored.shape == (2, 6, 3)
    for b in range(2):
        kept = kept_index[b].tolist()
        for i in range(6):
            want = y[b, kept.index(i)] if i in kept else before[b, i]
            assert torch.equal(restored[b, i], want)


# ---------- ToMe ----------

@pytest.mark.parametrize("prefix", [0, 1, 2])
@pytest.mark.parametrize("n", [12, 13])
def test_bipartite_soft_matching_matches_loops(prefix, n):
    torch.manual_seed(20 + n + prefix)
    metric = torch.randn(2, n, 5)
    n_a = len(range(prefix + prefix % 2, n, 2))
    for r in sorted({0, 1, n_a // 2, n_a}):
        kept_index, assignment = bipartite_soft_matching(metric, r, prefix)
        want_kept, want_assign = ref_bipartite(metric, r, prefix)
        assert torch.equal(kept_index, want_kept), r
        assert torch.equal(assignment, want_assign), r
        assert torch.equal(kept_index, kept_index.sort(1).values)
        assert (assignment[:, :prefix] == torch.arange(prefix)).all()


@pytest.mark.parametrize("prefix,n", [(0, 1), (1, 2), (2, 3)])
def test_one_token_after_the_prefix_has_nothing_to_merge_into(prefix, n):
    """Set B is empty: ToMe can merge nothing (short texts after a few blocks of merging)."""
    kept_index, assignment = bipartite_soft_matching(torch.randn(2, n, 4), 0, prefix)
    assert torch.equal(kept_index, torch.arange(n).expand(2, n)) and torch.equal(assignment, kept_index)
    assert tome_pairs(prefix, n - prefix) == 0 and tome_pairs(prefix, 2) == 1 and tome_pairs(0, 5) == 2


def test_bipartite_r0_is_identity():
    metric = torch.randn(2, 9, 4)
    kept_index, assignment = bipartite_soft_matching(metric, 0, 1)
    assert torch.equal(kept_index, torch.arange(9).expand(2, 9))
    assert torch.equal(assignment, torch.arange(9).expand(2, 9))


@pytest.mark.parametrize("prefix,distill", [(0, False), (1, False), (2, True)])
def test_bipartite_equals_tome_up_to_order(prefix, distill):
    torch.manual_seed(30 + prefix)
    x = torch.randn(2, 14, 6)
    for r in (3, (14 - prefix) // 2):
        kept_index, assignment = bipartite_soft_matching(x, r, prefix)
        ours, ours_size = merge_tokens(x, torch.ones(2, 14), assignment, 14 - r)
        tome, tome_size = tome_merge_wavg(x, x, r, class_token=prefix >= 1, distill_token=distill)
        for b in range(2):
            order_ours, order_tome = ours[b, :, 0].argsort(), tome[b, :, 0].argsort()
            torch.testing.assert_close(ours[b, order_ours], tome[b, order_tome])
            torch.testing.assert_close(ours_size[b, order_ours], tome_size[b, order_tome])
            torch.testing.assert_close(ours[b, :prefix], tome[b, :prefix])


# ---------- proportional attention ----------

@pytest.mark.parametrize("d,dv,scale,queries", [(64, 64, None, 10), (7, 7, None, 10), (8, 8, 0.3, 10), (15, 9, None, 10),
                                                 (16, 16, None, 1)])  # 1: a CLS querying another branch
def test_proportional_attention_forms_match_explicit(d, dv, scale, queries):
    torch.manual_seed(d + dv)
    q, k, v = torch.randn(2, 3, queries, d), torch.randn(2, 3, 10, d), torch.randn(2, 3, 10, dv)
    size = torch.randint(1, 6, (2, 10)).float()
    want = explicit_attention(q, k, v, size, d ** -0.5 if scale is None else scale)
    mask = size_bias(size)
    assert mask.shape == (2, 1, 1, 10) and mask.dtype == torch.float32
    masked = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    torch.testing.assert_close(masked, want, rtol=1e-5, atol=1e-5)
    fused = proportional_attention(q, k, v, size, scale)
    assert fused.shape == (2, 3, queries, dv)
    torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-5)


def test_proportional_attention_with_unit_sizes_is_plain_attention():
    torch.manual_seed(4)
    q, k, v = torch.randn(3, 2, 3, 9, 16).unbind(0)
    plain = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(proportional_attention(q, k, v, torch.ones(2, 9)), plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(size_bias(torch.ones(2, 9, dtype=torch.long)), torch.zeros(2, 1, 1, 9))


def sdpa_ops(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if "scaled_dot_product" in e.name}


def test_cpu_sdpa_kernels():
    """Both forms keep the fused CPU flash kernel; an unpadded v (narrower than q) would not."""
    torch.manual_seed(5)
    q, k, v = torch.randn(3, 2, 2, 9, 16).unbind(0)
    size = torch.randint(1, 4, (2, 9)).float()
    flash = "aten::_scaled_dot_product_flash_attention_for_cpu"
    math_ = "aten::_scaled_dot_product_attention_math"
    a = sdpa_ops(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=size_bias(size)))
    b = sdpa_ops(lambda: proportional_attention(q, k, v, size))
    assert flash in a and math_ not in a
    assert flash in b and math_ not in b
    narrow = sdpa_ops(lambda: F.scaled_dot_product_attention(F.pad(q, (0, 8)), F.pad(k, (0, 8)), v))
    assert math_ in narrow and flash not in narrow


# ---------- graph capture ----------

class Merger(torch.nn.Module):
    def forward(self, x, q, k, v, size, before):
        kept_index, assignment = bipartite_soft_matching(x, 2, 1)
        merged, merged_size = merge_tokens(x, size, assignment, 7)
        again = assign_to_kept(x, kept_index, 1)
        attended = proportional_attention(q, k, v, size) + F.scaled_dot_product_attention(
            q, k, v, attn_mask=size_bias(size))
        return (merged, merged_size, unmerge(merged, assignment), again,
                restore_dropped(merged, kept_index, before), attended)


def merger_inputs():
    torch.manual_seed(6)
    x = torch.randn(2, 9, 8)
    q, k, v = torch.randn(3, 2, 2, 9, 8).unbind(0)
    return x, q, k, v, torch.randint(1, 3, (2, 9)).float(), torch.randn(2, 9, 8)


def assert_same_outputs(got, want):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_symbolic_trace():
    inputs = merger_inputs()
    traced = torch.fx.symbolic_trace(Merger())
    assert_same_outputs(traced(*inputs), Merger()(*inputs))


def test_torch_compile_fullgraph():
    inputs = merger_inputs()
    compiled = torch.compile(Merger(), fullgraph=True, backend="eager")
    assert_same_outputs(compiled(*inputs), Merger()(*inputs))


# ---------- pooling over merged tokens ----------

@given(sizes=st.lists(st.lists(st.integers(1, 4), min_size=3, max_size=3), min_size=1, max_size=3),
       channels=st.integers(1, 5), keepdim=st.booleans())
def test_size_weighted_pooling_is_pooling_over_the_original_tokens(sizes, channels, keepdim):
    """A merged token of size s pools as its s original copies would (repeat_interleave, plain mean)."""
    size = torch.tensor(sizes)
    x = torch.randn(len(sizes), 3, channels, dtype=torch.float64)
    copies = [row.repeat_interleave(s, dim=0) for row, s in zip(x, size)]
    for weighted, plain in ((size_weighted_sum, torch.sum), (size_weighted_mean, torch.mean)):
        got = weighted(x, size, keepdim)
        want = torch.stack([plain(c, 0, keepdim=keepdim) for c in copies])
        torch.testing.assert_close(got, want)


# ---------- Ward's cost: the merge that changes the tokens least ----------

def merge_loss(x, size, a, b):
    """Squared error of replacing tokens a and b by their size-weighted mean, over the original tokens."""
    mean = (size[a] * x[a] + size[b] * x[b]) / (size[a] + size[b])
    return float(size[a] * (x[a] - mean).square().sum() + size[b] * (x[b] - mean).square().sum())


@given(seed=st.integers(0, 2 ** 31 - 1), n=st.integers(2, 9), prefix=st.integers(0, 1),
       sizes=st.lists(st.integers(1, 6), min_size=10, max_size=10))
def test_ward_matching_merges_the_pair_that_loses_least(seed, n, prefix, sizes):
    """With sizes, ToMe's matching of one token merges the A-B pair whose size-weighted mean loses
    the least over the original tokens (brute force over the pairs), and the assignment of a leaving
    token sends it to the kept token where it loses least."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, prefix + n, 3, generator=generator, dtype=torch.float64) * 5
    size = torch.tensor(sizes[:prefix + n]).unsqueeze(0)
    kept_index, assignment = bipartite_soft_matching(x, 1, prefix, size=size)
    merged, merged_size = merge_tokens(x, size, assignment, prefix + n - 1)
    after = unmerge(merged, assignment)
    lost = float((size[0, :, None] * (x[0] - after[0]).square()).sum())
    a_side, b_side = range(prefix + prefix % 2, prefix + n, 2), range(prefix + 1 - prefix % 2, prefix + n, 2)
    least = min(merge_loss(x[0], size[0], a, b) for a in a_side for b in b_side)
    assert lost == pytest.approx(least, rel=1e-6, abs=1e-9)
    assert int(merged_size.sum()) == int(size.sum())

    assignment = assign_to_kept(x, kept_index, prefix, size=size)
    leaving = sorted(set(range(prefix + n)) - set(kept_index[0].tolist()))[0]
    went = kept_index[0, assignment[0, leaving]]
    kept_after_prefix = kept_index[0, prefix:].tolist()
    assert merge_loss(x[0], size[0], leaving, went) == pytest.approx(
        min(merge_loss(x[0], size[0], leaving, j) for j in kept_after_prefix), rel=1e-6, abs=1e-9)
