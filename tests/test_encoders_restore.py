"""Models whose output keeps every token prune with restore: bare Hugging Face encoders (text,
vision, audio) and a hierarchical ViT whose stages reshape tokens back to a grid. Each: FLOPs fall
at keep 0.7, the output keeps its shape, keep=1.0 is the original to 1e-5, the model is unchanged."""
import pytest
import timm
import torch

import repshift_fx
from conftest import assert_close, assert_unchanged, last_hidden, snapshot

transformers = pytest.importorskip("transformers", reason="pip install -c constraints.txt transformers (extra [hf])")
SMALL = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64)
IMAGE = {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}


def _encoder(name: str):
    torch.manual_seed(0)
    if name == "Wav2Vec2Model":
        config = transformers.Wav2Vec2Config(conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                                             num_feat_extract_layers=2, num_conv_pos_embeddings=8,
                                             num_conv_pos_embedding_groups=4, **SMALL)
        return transformers.Wav2Vec2Model._from_config(config, attn_implementation="sdpa").eval(), \
            {"input_values": torch.randn(2, 400)}
    if name == "RobertaModel":
        config = transformers.RobertaConfig(vocab_size=100, max_position_embeddings=40, **SMALL)
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, 9:] = 0
        return transformers.RobertaModel._from_config(config, attn_implementation="sdpa").eval(), \
            {"input_ids": torch.randint(3, 100, (2, 12)), "attention_mask": mask}
    config_class = {"ViTModel": transformers.ViTConfig, "Dinov2Model": transformers.Dinov2Config,
                    "CLIPVisionModel": transformers.CLIPVisionConfig}[name]
    model_class = getattr(transformers, name)
    return model_class._from_config(config_class(image_size=32, patch_size=8, **SMALL), attn_implementation="sdpa").eval(), \
        IMAGE


@pytest.mark.parametrize("name", ("ViTModel", "Dinov2Model", "CLIPVisionModel", "Wav2Vec2Model", "RobertaModel"))
def test_a_bare_encoder_prunes_and_returns_every_token(name):
    model, inputs = _encoder(name)
    before = snapshot(model)
    with torch.no_grad():
        original = last_hidden(model(**inputs))
    report = repshift_fx.inspect(model, inputs, keep=0.7)
    assert report.flop_ratio < 0.9 and report.blocks[-1].restored
    pruned = repshift_fx.compress(model, inputs, keep=0.7, reduce="merge", compile=False)
    assert last_hidden(pruned(**inputs)).shape == original.shape
    assert_close(last_hidden(repshift_fx.compress(model, inputs, keep=1.0, compile=False)(**inputs)), original)
    assert_unchanged(model, before)


def test_a_hierarchical_vit_prunes_inside_its_stages():
    """PiT pools its tokens into a smaller grid between stages: every stage with a drop gives its
    tokens back before its pooling."""
    torch.manual_seed(0)
    model, x = timm.create_model("pit_ti_224", img_size=112).eval(), torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        original = model(x)
    report = repshift_fx.inspect(model, x, keep=0.7)
    assert report.flop_ratio < 0.9 and [row.index for row in report.blocks if row.restored] == [7, 11]
    assert_close(repshift_fx.compress(model, x, keep=1.0, compile=False)(x), original)
    assert repshift_fx.compress(model, x, keep=0.7, reduce="merge", compile=False)(x).shape == original.shape


def test_twins_prunes_the_mlps_of_its_stages():
    """Twins-PCPVT needs every token between its MLPs (spatial-reduction attention over the grid, a
    positional convolution after each stage's first block): its drops are MLP-only."""
    torch.manual_seed(0)
    model = timm.create_model("twins_pcpvt_small", depths=(1, 2, 3, 1), img_size=128).eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        original = model(x)
    report = repshift_fx.inspect(model, x, keep=0.7)
    assert report.flop_ratio < 0.99 and any(row.mlp_tokens for row in report.blocks)
    assert_close(repshift_fx.compress(model, x, keep=1.0, compile=False)(x), original)
    assert repshift_fx.compress(model, x, keep=0.7, compile=False)(x).shape == original.shape
