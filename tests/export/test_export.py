"""ONNX export: the file run in onnxruntime equals the eager compressed graph (relative error 1e-4) on
a ViT, a BERT with a padding mask and a ResNet in lines mode, at the export's batch size and another;
keep=1.0 equals the original model; refusals, unexportable ops and unwritable paths are clear errors
that leave nothing behind; the user's model is unchanged."""
import repshift_fx  # noqa: F401  (before timm)

import re

import pytest
import torch
import transformers

from conftest import PerToken, assert_close, assert_unchanged, snapshot, tiny_timm
from repshift_fx import ExportError, UnsupportedSiteError
from repshift_fx.capture.inputs import as_args
from repshift_fx.export.diagnose import export_error
from repshift_fx.export.runtime import run_eager, run_session, session

TOL = 1e-4


@torch.library.custom_op("repshift_export_test::wiggle", mutates_args=())
def wiggle(x: torch.Tensor) -> torch.Tensor:
    """An op torch.export can trace (it has a fake implementation) but ONNX cannot translate."""
    return x * 1.5


@wiggle.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("repshift_export_test::opaque", mutates_args=())
def opaque(x: torch.Tensor) -> torch.Tensor:
    """An op without a fake implementation: torch.export cannot trace it."""
    return x * 1.5


class Act(torch.nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op

    def forward(self, x):
        return self.op(torch.nn.functional.gelu(x))


def hooks(model: torch.nn.Module) -> list:
    return [(name, len(m._forward_hooks), len(m._forward_pre_hooks), m.training) for name, m in model.named_modules()]


def assert_onnx_matches(path, module, inputs, tol: float = TOL) -> None:
    """The ONNX file in onnxruntime against `module` run eagerly on `inputs`, output by output."""
    args = as_args(inputs, module)
    got, want = run_session(session(path), args), run_eager(module, args)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert_close(torch.from_numpy(g), torch.from_numpy(w), tol)


def tiny_bert(layers: int = 3):
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.BertModel._from_config(config, attn_implementation="sdpa").eval()


def padded_text(batch: int, seed: int) -> dict:
    """`batch` sequences of 12 tokens, every other one padded after 3 or 5: more padding than the
    drops remove, so some padded tokens, which all score lowest, are kept, chosen among equal
    scores; the selection breaks the ties the same way in torch and in onnxruntime."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, 12, dtype=torch.long)
    for row in range(1, batch, 2):
        mask[row, 2 + row % 4:] = 0
    return {"input_ids": torch.randint(1, 100, (batch, 12), generator=generator), "attention_mask": mask}


@pytest.fixture(scope="module")
def deit():
    return tiny_timm("deit_tiny_patch16_224", depth=3, img_size=48)


def image(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 48, 48)


def test_deit_matches_the_eager_graph_at_the_export_batch_and_another(deit, tmp_path):
    before, before_hooks = snapshot(deit), hooks(deit)
    x = image(2)
    exported = repshift_fx.export(deit, x, tmp_path / "deit.onnx", keep=0.7, at=(0, 1))
    gm = exported.module  # the eager graph: compress(deit, x, keep=0.7, at=(0, 1), compile=False)
    assert [row.tokens_out for row in exported.report.blocks] == [8, 6, 6]  # CLS + ceil(0.7 * 9), ceil(0.7 * 7)
    assert exported.input_names == ["x"] and exported.output_names == ["output"] and exported.max_error <= TOL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deit.onnx"]  # one file: no .data, no temporary
    assert_onnx_matches(exported.path, gm, x)
    assert_onnx_matches(exported.path, gm, image(5))
    assert_unchanged(deit, before)
    assert hooks(deit) == before_hooks


def test_tome_by_wards_cost_matches_the_eager_graph(deit, tmp_path):
    """Merging (sizes, Ward's cost, proportional attention as an attn_mask) runs in onnxruntime too."""
    x = image(2)
    exported = repshift_fx.export(deit, x, tmp_path / "tome.onnx", score="tome", r=2, merge_metric="ward")
    assert [row.tokens_out for row in exported.report.blocks] == [8, 6, 4]
    assert_onnx_matches(exported.path, exported.module, x)
    assert_onnx_matches(exported.path, exported.module, image(5))


def test_keep_one_from_a_batch_of_one_is_the_original_model(deit, tmp_path):
    """A batch of 1 still exports a dynamic batch axis (traced at 2)."""
    exported = repshift_fx.export(deit, image(1), tmp_path / "full.onnx", keep=1.0, check=False)
    import onnx

    batch_axis = onnx.load(str(exported.path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_axis.dim_param == "batch"
    assert_onnx_matches(exported.path, deit, image(3))


def test_bert_with_a_padding_mask_matches_the_eager_graph(tmp_path):
    bert = tiny_bert()
    before = snapshot(bert)
    text = padded_text(3, seed=1)
    exported = repshift_fx.export(bert, text, tmp_path / "bert.onnx", keep=0.5, at=(0, 1), check=False)
    assert exported.input_names == ["input_ids", "attention_mask"]
    assert exported.output_names == ["last_hidden_state", "pooler_output"]
    gm = exported.module
    assert [row.tokens_out for row in gm.report.blocks][:2] == [7, 4]  # CLS + ceil(0.5 * 11), + ceil(0.5 * 6)
    for batch, seed in ((3, 1), (5, 2)):
        assert_onnx_matches(exported.path, gm, padded_text(batch, seed))
    assert_unchanged(bert, before)


def test_resnet18_in_lines_mode_matches_the_eager_graph(resnet18, tmp_path):
    x = torch.randn(2, 3, 64, 64)
    config = dict(mode="lines", keep=0.6, at=(1, 4))
    exported = repshift_fx.export(resnet18, x, tmp_path / "r18.onnx", check=False, **config)
    assert exported.report.mode == "lines"
    for batch in (2, 3):
        assert_onnx_matches(exported.path, exported.module, torch.randn(batch, 3, 64, 64))


def test_a_refused_model_raises_what_compress_raises_and_writes_nothing(deit, tmp_path):
    model, x, config = PerToken(deit).eval(), image(2), dict(keep=0.7, at=(1,), restore=False)
    with pytest.raises(UnsupportedSiteError) as compressing:
        repshift_fx.compress(model, x, compile=False, **config)
    with pytest.raises(UnsupportedSiteError) as exporting:
        repshift_fx.export(model, x, tmp_path / "out" / "model.onnx", **config)
    assert str(exporting.value) == str(compressing.value)
    assert list(tmp_path.iterdir()) == []  # not even the folder it would have made


def test_an_unwritable_path_is_a_clear_error_and_leaves_nothing(deit, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(ExportError, match="cannot write .*a_file"):
        repshift_fx.export(deit, image(2), tmp_path / "a_file" / "model.onnx")
    (tmp_path / "taken.onnx").mkdir()  # the rename at the end fails: the written temporary must go
    with pytest.raises(ExportError, match="cannot write .*taken.onnx"):
        repshift_fx.export(deit, image(2), tmp_path / "taken.onnx", keep=0.7, at=(1,), check=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "taken.onnx"]
    assert list((tmp_path / "taken.onnx").iterdir()) == []


def test_a_failed_check_keeps_the_existing_file(deit, tmp_path, monkeypatch):
    """The onnxruntime check runs before the rename: a file that fails it never replaces the old one."""
    from repshift_fx.export import onnx as export_onnx

    monkeypatch.setattr(export_onnx, "CHECK_TOLERANCE", -1.0)  # every result fails it
    (tmp_path / "model.onnx").write_bytes(b"old")
    with pytest.raises(ExportError, match="differs from the compressed graph"):
        repshift_fx.export(deit, image(2), tmp_path / "model.onnx", keep=0.7, at=(0,))
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"] and (tmp_path / "model.onnx").read_bytes() == b"old"


@pytest.mark.parametrize("op,stage", [(torch.ops.repshift_export_test.wiggle, "ONNX has no translation"),
                                      (torch.ops.repshift_export_test.opaque, "torch.export could not trace")])
def test_an_op_that_cannot_be_exported_is_named_with_its_module(op, stage, tmp_path):
    model = tiny_timm("deit_tiny_patch16_224", depth=3, img_size=32)
    model.blocks[1].mlp.act = Act(op)
    with pytest.raises(ExportError) as caught:
        repshift_fx.export(model, torch.randn(2, 3, 32, 32), tmp_path / "m.onnx", keep=0.7, at=(0,), check=False)
    message = str(caught.value)
    assert stage in message and "module 'blocks.1.mlp.act'" in message and caught.value.module == "blocks.1.mlp.act"
    assert "wiggle" in message or "opaque" in message
    assert list(tmp_path.iterdir()) == []


def test_a_node_the_pass_inserted_is_described_not_named(deit):
    gm = repshift_fx.compress(deit, image(2), keep=0.7, at=(0, 1), compile=False)
    error = export_error(RuntimeError("boom\nWhile executing %repshift_index_1 : [num_users=2]"), gm, True)
    message = str(error)
    assert "token selection" in message and "after block 1 (module 'blocks.1')" in message and "repshift_index" not in message


@pytest.mark.parametrize("path", [None, 5, ""])
def test_a_path_that_is_no_path_is_refused(deit, path):
    with pytest.raises(ExportError, match="path must be the .onnx file to write"):
        repshift_fx.export(deit, torch.randn(2, 3, 64, 64), path, keep=0.7)


@pytest.mark.parametrize("options, words", [(dict(onnx_options=["opset_version", 18]), "must be a dict"),
                                            (dict(onnx_options={"dynamo": False}), "set by export() itself"),
                                            (dict(check="off"), "check must be True or False"),
                                            (dict(dynamic_batch="no"), "dynamic_batch must be True or False"),
                                            (dict(score="random"), "check=False (CLI: --no-check)")])
def test_export_options_are_checked_before_anything_runs(deit, tmp_path, options, words):
    with pytest.raises(ExportError, match=re.escape(words)):
        repshift_fx.export(deit, torch.randn(2, 3, 64, 64), tmp_path / "m.onnx", **options)
    assert not any(tmp_path.iterdir())
