"""Plain eager oracles for the families of tests/test_hf.py and tests/test_side_tensors.py.

They loop over the model's layers by hand, prune per sample with Python indexing, and share no
code with repshift_fx: a Hugging Face BERT with a padding mask (post-norm, mean or CLS pooling), the
Hugging Face ViT and DINOv2 (LayerScale) image classifiers, and timm's EVA02 (rotary tables cut to the
kept tokens).
"""
import math

import torch


def keep_per_sample(scores, prefix, keep):
    """Indices kept per sample: the prefix, then the ceil(keep * n) best others, in order. (B, N) -> (B, K)."""
    n = scores.shape[1] - prefix
    k = math.ceil(round(keep * n, 9))
    rows = []
    for b in range(scores.shape[0]):
        order = sorted(range(prefix, scores.shape[1]), key=lambda i: -float(scores[b, i]))
        rows.append(list(range(prefix)) + sorted(order[:k]))
    return torch.tensor(rows)


def take(x, index):
    """x[b, index[b]] per sample: (B, N, ...) -> (B, K, ...)."""
    return torch.stack([x[b, index[b]] for b in range(x.shape[0])])


def _bert_attention(layer, x, real):
    sa = layer.attention.self
    batch, tokens, channels = x.shape
    heads, dim = sa.num_attention_heads, sa.attention_head_size

    def split(t):
        return t.view(batch, tokens, heads, dim).transpose(1, 2)

    q, k, v = split(sa.query(x)), split(sa.key(x)), split(sa.value(x))
    scores = q @ k.transpose(-1, -2) / math.sqrt(dim)
    scores = scores.masked_fill(~real[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1)
    context = (probs @ v).transpose(1, 2).reshape(batch, tokens, channels)
    return layer.attention.output.LayerNorm(layer.attention.output.dense(context) + x), probs


@torch.no_grad()
def bert_reference(bert, input_ids, attention_mask, at, keep, pooling="mean", prefix=0, score="shift"):
    """A HF BertModel with Representation Shift pruning, by hand: after each block of `at`, keep the
    tokens whose MLP changed them most, ||MLP(x') - x'||_2 with x' the (post-norm) stream entering
    the MLP (score "attention": the CLS row of the block's attention, head-averaged, with a prefix;
    else the mean attention each token receives; "norm": the output's norm); a padded position
    always scores lowest. Returns the pooled (B, C) output."""
    schedule = dict(zip(at, keep if isinstance(keep, (tuple, list)) else [keep] * len(at)))
    x, real = bert.embeddings(input_ids=input_ids), attention_mask.bool()
    for i, layer in enumerate(bert.encoder.layer):
        mid, probs = _bert_attention(layer, x, real)
        branch = layer.output.dense(layer.intermediate(mid))
        x = layer.output.LayerNorm(branch + mid)
        if i in schedule:
            if score == "attention":
                scores = probs[:, :, 0].mean(1) if prefix else probs.mean(dim=(1, 2))
            else:
                scores = (branch - mid).norm(dim=-1) if score == "shift" else x.norm(dim=-1)
            scores = scores.masked_fill(~real, float("-inf"))
            index = keep_per_sample(scores, prefix, schedule[i])
            x, real = take(x, index), take(real, index)
    if pooling == "cls":
        return x[:, 0]
    weights = real.unsqueeze(-1).to(x.dtype)
    return (x * weights).sum(1) / weights.sum(1)


@torch.no_grad()
def vision_reference(model, pixel_values, at, keep):
    """A HF ViTForImageClassification or Dinov2ForImageClassification (pre-norm, one CLS token) pruned
    by hand: after each block of `at`, keep the CLS token and the tokens whose MLP branch (times the
    LayerScale in DINOv2) is farthest from the stream entering it. Returns the logits."""
    schedule = dict(zip(at, keep if isinstance(keep, (tuple, list)) else [keep] * len(at)))
    dinov2 = hasattr(model, "dinov2")
    base = model.dinov2 if dinov2 else model.vit
    x = base.embeddings(pixel_values)
    for i, layer in enumerate(base.encoder.layer if dinov2 else base.layers):
        if dinov2:
            mid = x + layer.layer_scale1(layer.attention(layer.norm1(x))[0])
            branch = layer.layer_scale2(layer.mlp(layer.norm2(mid)))
        else:
            mid = x + layer.attention(layer.layernorm_before(x))[0]
            branch = layer.mlp(layer.layernorm_after(mid))
        x = mid + branch
        if i in schedule:
            x = take(x, keep_per_sample((branch - mid).norm(dim=-1), 1, schedule[i]))
    x = base.layernorm(x)
    return model.classifier(torch.cat([x[:, 0], x[:, 1:].mean(1)], dim=1) if dinov2 else x[:, 0])


def _rotate(x):
    return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)


def _eva_attention(attn, x, rope):
    """timm EvaAttention on (B, N, C) with a per-sample rope (B, N - 1, 2D) [sin | cos]."""
    batch, tokens, channels = x.shape
    bias = torch.cat([attn.q_bias, attn.k_bias, attn.v_bias]) if attn.q_bias is not None else None
    qkv = torch.nn.functional.linear(x, attn.qkv.weight, bias)
    q, k, v = qkv.reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    sin, cos = rope.unsqueeze(1).tensor_split(2, -1)  # (B, 1, N - 1, D) each
    q = torch.cat([q[:, :, :1], q[:, :, 1:] * cos + _rotate(q[:, :, 1:]) * sin], dim=2)
    k = torch.cat([k[:, :, :1], k[:, :, 1:] * cos + _rotate(k[:, :, 1:]) * sin], dim=2)
    weights = (q * attn.scale) @ k.transpose(-2, -1)
    out = (weights.softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, channels)
    return attn.proj(attn.norm(out))


@torch.no_grad()
def eva_reference(model, img, at, keep):
    """timm EVA02 (one CLS token, rotary embeddings in every block) pruned by hand: the rope rows of
    the dropped patch tokens are dropped with them. Returns the logits."""
    schedule = dict(zip(at, keep if isinstance(keep, (tuple, list)) else [keep] * len(at)))
    x, rope = model._pos_embed(model.patch_embed(img))
    x = model.norm_pre(x)
    rope = rope.unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, N - 1, 2D): no row for the CLS token
    for i, blk in enumerate(model.blocks):
        branch = _eva_attention(blk.attn, blk.norm1(x), rope)
        mid = x + (blk.gamma_1 * branch if blk.gamma_1 is not None else branch)
        branch = blk.mlp(blk.norm2(mid))
        branch = branch * blk.gamma_2 if blk.gamma_2 is not None else branch
        x = mid + branch
        if i in schedule:
            index = keep_per_sample((branch - mid).norm(dim=-1), 1, schedule[i])
            x = take(x, index)
            rope = take(rope, index[:, 1:] - 1)
    return model.forward_head(model.norm(x))


def _beit_attention(attn, x, bias):
    """timm BEiT Attention with a per-sample relative-position bias (B, H, N, N)."""
    batch, tokens, channels = x.shape
    qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)) if attn.q_bias is not None else attn.qkv.bias
    qkv = torch.nn.functional.linear(x, attn.qkv.weight, qkv_bias)
    q, k, v = qkv.reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    weights = (q * attn.scale) @ k.transpose(-2, -1) + bias
    out = (weights.softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, channels)
    return attn.proj(out)


@torch.no_grad()
def beit_reference(model, img, at, keep):
    """timm BEiT (a relative-position bias table in every block) pruned by hand: each block's
    (H, N, N) bias keeps the rows and columns of the kept tokens. Returns the logits."""
    schedule = dict(zip(at, keep if isinstance(keep, (tuple, list)) else [keep] * len(at)))
    x = model.patch_embed(img)
    x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    x = x + model.pos_embed if model.pos_embed is not None else x
    place = torch.arange(x.shape[1]).expand(x.shape[0], -1)  # each token's original position
    for i, blk in enumerate(model.blocks):
        table = blk.attn._get_rel_pos_bias()[0]  # (H, N, N) over the original tokens
        bias = torch.stack([table[:, p][:, :, p] for p in place])
        gamma_1 = blk.gamma_1 if blk.gamma_1 is not None else 1.0
        gamma_2 = blk.gamma_2 if blk.gamma_2 is not None else 1.0
        mid = x + gamma_1 * _beit_attention(blk.attn, blk.norm1(x), bias)
        branch = gamma_2 * blk.mlp(blk.norm2(mid))
        x = mid + branch
        if i in schedule:
            index = keep_per_sample((branch - mid).norm(dim=-1), 1, schedule[i])
            x, place = take(x, index), take(place, index)
    return model.forward_head(model.norm(x))
