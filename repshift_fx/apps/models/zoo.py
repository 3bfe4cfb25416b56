"""The zoo: small random-weight models of many families, each with its example input.

    for entry in ENTRIES: model, inputs = entry.build()      # inputs: a tensor or a dict of tensors

`kind` groups them ("timm transformer", "timm other", "torchvision", "hf"); `FAST` names the
subset the test suite runs (tests/test_zoo.py); tools/zoo.py sweeps them all.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch  # timm, torchvision and transformers: in the builders, after repshift_fx's torchvision guard


@dataclass
class Entry:
    name: str  # "timm:NAME", "torchvision:NAME", "hf:CLASS"
    kind: str
    make: Callable  # () -> (model, inputs)
    notes: dict = field(default_factory=dict)

    def build(self):
        torch.manual_seed(0)
        model, inputs = self.make()
        return model.eval(), inputs


def _images(size: int, batch: int = 2, frames: int | None = None) -> torch.Tensor:
    shape = (batch, 3, size, size) if frames is None else (batch, frames, 3, size, size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


# --- timm: the smallest variant of each family, made smaller where the family allows ---

VIT = dict(depth=2, img_size=64)
TIMM_TRANSFORMERS = {  # name -> (create_model kwargs, input size)
    "deit_tiny_patch16_224": (VIT, 64), "deit_tiny_distilled_patch16_224": (VIT, 64),
    "deit3_small_patch16_224": (VIT, 64), "vit_tiny_patch16_224": (VIT, 64),
    "vit_small_patch14_reg4_dinov2": (dict(depth=2, img_size=56), 56), "vit_tiny_r_s16_p8_224": (dict(img_size=64), 64),
    "vit_base_patch32_clip_224": (VIT, 64), "vit_medium_patch16_gap_256": (VIT, 64),
    "vit_little_patch16_reg4_gap_256": (VIT, 64), "vit_betwixt_patch16_reg4_gap_256": (VIT, 64),
    "vit_base_patch16_siglip_224": (VIT, 64), "vit_relpos_small_patch16_224": (VIT, 64),
    "vit_srelpos_small_patch16_224": (VIT, 64), "vit_small_patch16_rope_224": (VIT, 64),
    "naflexvit_base_patch16_gap": (dict(depth=2), 64), "flexivit_small": (VIT, 64),
    "eva02_tiny_patch14_224": (dict(depth=2, img_size=56), 56), "beit_base_patch16_224": (VIT, 64),
    "beitv2_base_patch16_224": (VIT, 64), "cait_xxs24_224": (dict(img_size=64), 64),
    "xcit_nano_12_p16_224": (dict(depth=2, img_size=64), 64), "convit_tiny": (dict(depth=2, img_size=64), 64),
    "samvit_base_patch16": (dict(depth=2, img_size=64, global_attn_indexes=(1,)), 64),
    "crossvit_tiny_240": ({}, 240), "pit_ti_224": (dict(img_size=112), 112), "levit_128s": (dict(img_size=96), 96),
    "tnt_s_patch16_224": (dict(img_size=64), 64),
    "swin_tiny_patch4_window7_224": (dict(depths=(2, 2), num_heads=(2, 4), img_size=112), 112),
    "swinv2_cr_tiny_224": ({}, 224), "twins_pcpvt_small": (dict(depths=(1, 1, 2, 2)), 224),
    "twins_svt_small": (dict(depths=(1, 1, 2, 2)), 224), "coat_lite_tiny": ({}, 224), "coat_tiny": ({}, 224),
    "mvitv2_tiny": ({}, 224), "hiera_tiny_224": ({}, 224), "tiny_vit_5m_224": ({}, 224),
    "mobilevit_xxs": (dict(img_size=128), 128), "mobilevitv2_050": ({}, 128), "efficientformer_l1": ({}, 224),
    "efficientformerv2_s0": ({}, 224), "volo_d1_224": ({}, 224), "gcvit_xxtiny": ({}, 224),
    "maxvit_tiny_tf_224": ({}, 224), "nest_tiny": ({}, 224), "davit_tiny": ({}, 224), "pvt_v2_b0": ({}, 224),
    "visformer_tiny": ({}, 224), "focalnet_tiny_srf": ({}, 224), "edgenext_xx_small": ({}, 224),
    "vitamin_small_224": ({}, 224), "vit_pe_core_tiny_patch16_384": (dict(img_size=64), 64),
    "mixer_s16_224": (dict(img_size=64), 64), "resmlp_12_224": (dict(img_size=64), 64),
    "gmlp_ti16_224": (dict(img_size=64), 64),
}
TIMM_OTHERS = {"resnet18": ({}, 224), "convnext_atto": ({}, 224), "fastvit_t8": ({}, 224),
               "poolformer_s12": ({}, 224), "efficientnet_b0": ({}, 224), "regnetx_002": ({}, 224)}


def _timm(name: str, kwargs: dict, size: int):
    def make():
        import timm

        return timm.create_model(name, pretrained=False, **kwargs), _images(size)
    return make


# --- torchvision classifiers ---

TORCHVISION = {"vit_b_16": dict(image_size=64), "swin_t": {}, "maxvit_t": {}, "resnet18": {},
               "resnet50": {}, "mobilenet_v3_small": {}, "efficientnet_b0": {}, "convnext_tiny": {},
               "regnet_y_400mf": {}, "densenet121": {}, "shufflenet_v2_x0_5": {}, "mnasnet0_5": {},
               "squeezenet1_0": {}, "googlenet": dict(aux_logits=False, init_weights=True), "alexnet": {},
               "vgg11": {}, "wide_resnet50_2": {}, "resnext50_32x4d": {}}


def _torchvision(name: str, kwargs: dict):
    def make():
        import torchvision

        size = 64 if name == "vit_b_16" else 224
        return torchvision.models.get_model(name, weights=None, **kwargs), _images(size)
    return make


# --- Hugging Face transformers, tiny configs ---

SMALL = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64)


def _text_inputs(vocab: int = 100, length: int = 12, padded: bool = True) -> dict:
    ids = torch.randint(3, vocab, (2, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, length, dtype=torch.long)
    if padded:
        mask[1, length - 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _hf(model_class: str, config_class: str, inputs: Callable, **config):
    def make():
        import transformers

        cfg = getattr(transformers, config_class)(**config)
        model = getattr(transformers, model_class)._from_config(cfg, attn_implementation="sdpa") \
            if _takes_sdpa(model_class) else getattr(transformers, model_class)(cfg)
        return model, inputs()
    return make


def _takes_sdpa(model_class: str) -> bool:
    import transformers

    return bool(getattr(getattr(transformers, model_class), "_supports_sdpa", False))


VISION = dict(image_size=32, patch_size=8, **SMALL)
HF = {
    "BertModel": ("BertConfig", lambda: _text_inputs(), dict(vocab_size=100, max_position_embeddings=40, **SMALL)),
    "RobertaModel": ("RobertaConfig", lambda: _text_inputs(), dict(vocab_size=100, max_position_embeddings=40, **SMALL)),
    "XLMRobertaModel": ("XLMRobertaConfig", lambda: _text_inputs(),
                        dict(vocab_size=100, max_position_embeddings=40, **SMALL)),
    "DistilBertModel": ("DistilBertConfig", lambda: _text_inputs(),
                        dict(vocab_size=100, dim=32, n_layers=4, n_heads=2, hidden_dim=64, max_position_embeddings=40)),
    "AlbertModel": ("AlbertConfig", lambda: _text_inputs(), dict(vocab_size=100, embedding_size=16, **SMALL)),
    "ElectraModel": ("ElectraConfig", lambda: _text_inputs(), dict(vocab_size=100, embedding_size=16, **SMALL)),
    "MPNetModel": ("MPNetConfig", lambda: _text_inputs(), dict(vocab_size=100, **SMALL)),
    "DebertaV2Model": ("DebertaV2Config", lambda: _text_inputs(), dict(vocab_size=100, **SMALL)),
    "T5EncoderModel": ("T5Config", lambda: _text_inputs(),
                       dict(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=4, num_heads=2)),
    "ViTModel": ("ViTConfig", lambda: {"pixel_values": _images(32)}, VISION),
    "DeiTModel": ("DeiTConfig", lambda: {"pixel_values": _images(32)}, VISION),
    "Dinov2Model": ("Dinov2Config", lambda: {"pixel_values": _images(32)}, VISION),
    "CLIPVisionModel": ("CLIPVisionConfig", lambda: {"pixel_values": _images(32)}, VISION),
    "SiglipVisionModel": ("SiglipVisionConfig", lambda: {"pixel_values": _images(32)}, VISION),
    "BeitModel": ("BeitConfig", lambda: {"pixel_values": _images(32)},
                  dict(use_relative_position_bias=True, **VISION)),
    "Data2VecVisionModel": ("Data2VecVisionConfig", lambda: {"pixel_values": _images(32)}, VISION),
    "YolosModel": ("YolosConfig", lambda: {"pixel_values": _images(32)},
                   dict(num_detection_tokens=5, **dict(VISION, image_size=(32, 32)))),
    "ViTMAEModel": ("ViTMAEConfig", lambda: {"pixel_values": _images(32)}, dict(mask_ratio=0.0, **VISION)),
    "Wav2Vec2Model": ("Wav2Vec2Config", lambda: {"input_values": torch.randn(2, 400)},
                      dict(conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_feat_extract_layers=2,
                           num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4, **SMALL)),
    "HubertModel": ("HubertConfig", lambda: {"input_values": torch.randn(2, 400)},
                    dict(conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_feat_extract_layers=2,
                         num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4, **SMALL)),
    "VivitModel": ("VivitConfig", lambda: {"pixel_values": _images(32, frames=4)},
                   dict(image_size=32, num_frames=4, tubelet_size=(2, 8, 8), **SMALL)),
    "VideoMAEModel": ("VideoMAEConfig", lambda: {"pixel_values": _images(32, frames=4)},
                      dict(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, **SMALL)),
    "TimesformerModel": ("TimesformerConfig", lambda: {"pixel_values": _images(32, frames=4)},
                         dict(image_size=32, patch_size=8, num_frames=4, **SMALL)),
    "SwinModel": ("SwinConfig", lambda: {"pixel_values": _images(64)},
                  dict(image_size=64, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 2), window_size=4)),
    "SegformerModel": ("SegformerConfig", lambda: {"pixel_values": _images(64)},
                       dict(num_encoder_blocks=2, depths=(1, 1), sr_ratios=(2, 1), hidden_sizes=(16, 32),
                            patch_sizes=(7, 3), strides=(4, 2), num_attention_heads=(1, 2), mlp_ratios=(2, 2))),
    "MobileViTModel": ("MobileViTConfig", lambda: {"pixel_values": _images(64)}, dict(image_size=64)),
    "LevitModel": ("LevitConfig", lambda: {"pixel_values": _images(64)}, dict(image_size=64)),
    "ConvNextModel": ("ConvNextConfig", lambda: {"pixel_values": _images(64)},
                      dict(hidden_sizes=(16, 32, 64, 128), depths=(1, 1, 1, 1))),
    "ResNetModel": ("ResNetConfig", lambda: {"pixel_values": _images(64)},
                    dict(hidden_sizes=(16, 32, 64, 128), depths=(1, 1, 1, 1), embedding_size=16)),
    "GPT2Model": ("GPT2Config", lambda: _text_inputs(padded=False),
                  dict(vocab_size=100, n_embd=32, n_layer=4, n_head=2, n_positions=40, bos_token_id=0, eos_token_id=0)),
}

ENTRIES = (
    [Entry(f"timm:{n}", "timm transformer", _timm(n, *TIMM_TRANSFORMERS[n])) for n in TIMM_TRANSFORMERS]
    + [Entry(f"timm:{n}", "timm other", _timm(n, *TIMM_OTHERS[n])) for n in TIMM_OTHERS]
    + [Entry(f"torchvision:{n}", "torchvision", _torchvision(n, TORCHVISION[n])) for n in TORCHVISION]
    + [Entry(f"hf:{n}", "hf", _hf(n, c, i, **kw)) for n, (c, i, kw) in HF.items()]
)
BY_NAME = {e.name: e for e in ENTRIES}
# what the suite runs: one of each outcome and family, fast on 2 cores
# (vit_tiny_r_s16_p8_224's capture and YOLOS have tests of their own: tests/capture, tests/test_zoo.py)
FAST = ("timm:deit_tiny_patch16_224", "timm:naflexvit_base_patch16_gap", "timm:pit_ti_224",
        "timm:swin_tiny_patch4_window7_224", "timm:levit_128s", "timm:volo_d1_224", "timm:mixer_s16_224",
        "torchvision:vit_b_16", "torchvision:resnet18", "hf:BertModel", "hf:ViTModel", "hf:BeitModel")
