"""The `repshift-fx` command: inspect (table, JSON, DOT), the FLOP budget, bench, shiftmap, bad input."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import networkx as nx
import numpy as np
import pydot
import pytest
import torch
from PIL import Image

from repshift_fx.apps import cli
from repshift_fx.apps.specs import SpecError

TINY = ["timm:deit_tiny_patch16_224", "--kwargs", '{"depth": 4, "img_size": 64}']
DEIT_S = "timm:deit_small_patch16_224"


def tiny_vit(depth: int = 2, img_size: int = 32, num_classes: int = 10):
    """A factory for the module.path:factory spec (this module is importable under pytest)."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", depth=depth, img_size=img_size, num_classes=num_classes)


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv) -> dict:
    code, out, err = run(capsys, *argv, "--format", "json")
    assert code == 0, err
    return json.loads(out)


BLOCK_KEYS = {"index", "module", "site", "mixer", "attention", "tokens_in", "tokens_out", "scored",
              "gflops_before", "gflops_after", "refused"}
TOP_KEYS = {"schema", "spec", "input", "model", "config", "blocks", "prefix", "prefix_source", "gflops_before",
            "gflops_after", "flop_ratio", "gflops_outside_before", "gflops_outside_after", "side_tensors",
            "refused", "budget", "notes"}


def _assert_flops_add_up(data):
    for when in ("before", "after"):
        parts = sum(b[f"gflops_{when}"] for b in data["blocks"]) + data[f"gflops_outside_{when}"]
        assert parts == pytest.approx(data[f"gflops_{when}"], rel=1e-9)


def test_inspect_json_deit_small_paper_rule(capsys):
    data = run_json(capsys, "inspect", DEIT_S, "--score", "shift")  # named, though it is Config's default
    assert TOP_KEYS <= set(data) and all(BLOCK_KEYS <= set(b) for b in data["blocks"])  # more may come
    assert data["input"] == [1, 3, 224, 224] and data["prefix"] == 1
    assert [b["tokens_in"] for b in data["blocks"]] == [197] * 4 + [139] * 3 + [98] * 3 + [69] * 2
    assert [b["index"] for b in data["blocks"] if b["scored"]] == [3, 6, 9]
    assert 4.55 < data["gflops_before"] < 4.65 and 3.0 < data["gflops_after"] < 3.2
    assert data["flop_ratio"] == pytest.approx(data["gflops_after"] / data["gflops_before"])
    assert {b["attention"] for b in data["blocks"]} == {"SDPA"} and data["budget"] is None
    _assert_flops_add_up(data)
    first, last = data["blocks"][0], data["blocks"][-1]
    assert first["gflops_before"] == first["gflops_after"] == last["gflops_before"]
    assert last["gflops_after"] < 0.4 * last["gflops_before"]  # 69 of 197 tokens


def test_inspect_target_flops_deit_small(capsys):
    data = run_json(capsys, "inspect", DEIT_S, "--target-flops", "0.65")  # the default reduction at 0.65
    assert 0.63 <= data["flop_ratio"] <= 0.65
    budget = data["budget"]
    assert budget["target"] == 0.65 and budget["reached"] == pytest.approx(data["flop_ratio"], abs=1e-12)
    assert data["config"]["score"] == "tome" and data["config"]["merge_metric"] == "ward"
    assert data["notes"][0].startswith("the default: ToMe by Ward's cost")
    assert [b["tokens_in"] - b["tokens_out"] for b in data["blocks"]] == list(data["config"]["r"])
    _assert_flops_add_up(data)


def test_inspect_table(capsys):
    code, out, err = run(capsys, "inspect", *TINY, "--keep", "0.5", "--at", "1")
    assert code == 0, err
    for text in ("block", "module", "site", "attention", "tokens in", "tokens out", "GFLOPs before",
                 "GFLOPs after", "attention + MLP", "prefix tokens kept: 1", "side tensors gathered: none",
                 "refused: nothing", "GFLOPs per sample"):
        assert text in out, text


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydot's parser on pyparsing 3.3
def test_inspect_dot_parses_and_highlights(capsys, tmp_path):
    target = tmp_path / "graph.dot"
    code, _, err = run(capsys, "inspect", *TINY, "--keep", "0.5", "--at", "1", "--format", "dot", "-o", target)
    assert code == 0, err
    (graph,) = pydot.graph_from_dot_file(str(target))
    clusters = {s.get_name() for s in graph.get_subgraphs()}
    assert clusters == {f"cluster_block_{i}" for i in range(4)}
    nodes = {n.get_name().strip('"'): n for s in [graph, *graph.get_subgraphs()] for n in s.get_nodes()}
    for role in ("score", "index", "keep"):
        assert nodes[f"repshift_{role}_1"].get("fillcolor") is not None
    pruned = [n for n in nodes.values() if n.get("fillcolor") == '"#a8dadc"']
    assert pruned  # blocks 2 and 3 run on fewer tokens
    flow = nx.nx_pydot.from_pydot(graph)
    assert nx.is_directed_acyclic_graph(flow)
    assert nx.has_path(flow, "x", "repshift_keep_1") and nx.has_path(flow, "repshift_keep_1", "output")


def test_factory_spec_and_checkpoints(capsys, tmp_path):
    model = tiny_vit()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    for name in ("w.pt", "w.safetensors"):
        data = run_json(capsys, "inspect", "test_cli:tiny_vit", "--checkpoint", tmp_path / name, "--at", "0")
        assert data["input"] == [1, 3, 32, 32] and [b["tokens_in"] for b in data["blocks"]] == [5, 4]


def test_input_option_sets_the_token_count(capsys):
    data = run_json(capsys, "inspect", "timm:deit_tiny_patch16_224", "--kwargs", '{"depth": 2, "img_size": 48}',
                    "--input", "2x3x48x48", "--at", "0", "--keep", "0.5")
    assert data["input"] == [2, 3, 48, 48] and [b["tokens_in"] for b in data["blocks"]] == [10, 6]
    data = run_json(capsys, "inspect", *TINY, "--at", "0,2", "--keep", "0.5,0.75")  # one rate per block
    assert [b["tokens_in"] for b in data["blocks"]] == [17, 9, 9, 7] and data["config"]["keep"] == [0.5, 0.75]


def test_inspect_fuse_passes_one_fused_token_on(capsys):
    data = run_json(capsys, "inspect", *TINY, "--at", "0,2", "--keep", "0.5")
    fused = run_json(capsys, "inspect", *TINY, "--at", "0,2", "--keep", "0.5", "--fuse")
    assert [b["tokens_in"] for b in data["blocks"]] == [17, 9, 9, 5]
    assert [b["tokens_in"] for b in fused["blocks"]] == [17, 10, 10, 7]  # 1 + 8 + fused; 1 + ceil(9 / 2) + fused
    assert fused["config"]["fuse"] is True and fused["gflops_after"] > data["gflops_after"]


def test_inspect_merge_tome_and_restore_options(capsys):
    merged = run_json(capsys, "inspect", *TINY, "--at", "0,2", "--keep", "0.5", "--reduce", "merge")
    assert merged["config"]["reduce"] == "merge" and [b["reduce"] for b in merged["blocks"]] == ["merge", "", "merge", ""]
    assert "SDPA + log(size)" in merged["blocks"][1]["attention"]
    tome = run_json(capsys, "inspect", *TINY, "--score", "tome", "--r", "2")
    assert [b["tokens_in"] for b in tome["blocks"]] == [17, 15, 13, 11] and tome["config"]["r"] == 2
    schedule = run_json(capsys, "inspect", *TINY, "--score", "tome", "--r", "3,2,2,1")
    assert [b["tokens_in"] for b in schedule["blocks"]] == [17, 14, 12, 10] and schedule["config"]["r"] == [3, 2, 2, 1]
    code, _, err = run(capsys, "inspect", *TINY, "--score", "tome")
    assert code == 2 and "pass r=" in err
    off = run_json(capsys, "inspect", *TINY, "--restore", "off")
    assert off["config"]["restore"] is False


def test_shiftmap_png(capsys, tmp_path):
    from skimage import data as photos

    image, out = tmp_path / "astronaut.png", tmp_path / "map.png"
    Image.fromarray(photos.astronaut()).save(image)
    code, _, err = run(capsys, "shiftmap", *TINY, image, "--block", "1", "-o", out)
    assert code == 0, err
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.size == (2 * 64 * 2 + 8, 64 * 2)
        left = picture.crop((0, 0, 128, 128)).convert("L")
        assert len(np.unique(np.asarray(left))) > 20  # a picture, not a flat panel
    assert "kept 12 of 16" in err  # ceil(0.7 * 16)


def test_shiftmap_draws_rows_and_columns_of_a_cnn(capsys, tmp_path):
    from skimage import data as photos

    from repshift_fx.apps.shiftmap import GAP, STRIP

    image, out = tmp_path / "chelsea.png", tmp_path / "lines.png"
    Image.fromarray(photos.chelsea()).save(image)
    code, _, err = run(capsys, "shiftmap", "torchvision:resnet18", image, "--input", "1x3x96x96", "--block", "1",
                       "--keep", "0.5", "--scale", "1", "-o", out)
    assert code == 0, err
    assert "kept 12 of 24 rows, 12 of 24 columns" in err  # layer1 of resnet18 at 96 px: a 24 x 24 grid
    with Image.open(out) as picture:
        assert picture.size == (2 * 96 + STRIP + GAP, 96 + STRIP)
        heat = np.asarray(picture.crop((0, 0, 96, 96)).convert("L"))
        assert len(np.unique(heat)) > 20
    code, _, err = run(capsys, "shiftmap", "torchvision:resnet18", image, "--input", "1x3x96x96", "--mode", "tokens",
                       "-o", out)
    assert code == 2 and "tokens" in err


def test_token_shift_keeps_the_best_scored_patches():
    from repshift_fx.apps.shiftmap import shift_map

    model = tiny_vit(depth=4, img_size=64)
    smap = shift_map(model.eval(), torch.randn(1, 3, 64, 64), block=2, keep=0.5)
    assert smap.scores.shape == smap.kept.shape == (4, 4) and smap.prefix == 1
    assert smap.kept.sum() == smap.keep == 8
    assert smap.scores[smap.kept].min() >= smap.scores[~smap.kept].max()


def test_bench_tiny(capsys):
    code, out, err = run(capsys, "bench", "test_cli:tiny_vit", "--batch", "2", "--rounds", "1", "--at", "0",
                         "--no-overhead", "--threads", "1")
    assert code == 0, err
    for variant in ("baseline eager", "baseline compiled", "compressed eager", "compressed compiled"):
        assert variant in out
    assert "img/s" in out and "FLOP ratio" in out and "speedup" in out
    assert "timing rounds" in err  # the progress bar


def test_bench_of_a_merge_times_it_without_a_fixed_token_variant(capsys):
    """ToMe's merge sizes feed the later attention, so there is no slicing twin to time it against:
    the bench runs without that row rather than failing (a drop keeps it)."""
    from repshift_fx.apps.bench import build_variants
    model, x = tiny_vit(depth=2, img_size=32).eval(), torch.randn(2, 3, 32, 32)
    assert "fixed tokens compiled" in build_variants(model, (x,), keep=0.5, at=(0,))
    assert "fixed tokens compiled" not in build_variants(model, (x,), score="tome", r=1, merge_metric="stream")
    code, out, err = run(capsys, "bench", "test_cli:tiny_vit", "--batch", "2", "--rounds", "1", "--score", "tome",
                         "--r", "1", "--merge-metric", "stream", "--threads", "1")
    assert code == 0, err
    assert "compressed compiled" in out and "fixed tokens" not in out


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "garbage.pt").write_bytes(b"not a checkpoint")
    (root / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n")
    torch.save({"weight": torch.zeros(2), "payload": object()}, root / "objects.pt")
    torch.save(tiny_vit(num_classes=3).state_dict(), root / "other_head.pt")
    return root


BAD = {
    "unknown timm model": (["inspect", "timm:deit_smal"], "unknown timm model"),
    "unknown torchvision model": (["inspect", "torchvision:vit_b_17"], "unknown torchvision model"),
    "unknown module": (["inspect", "no_such_module:make"], "cannot import"),
    "malformed spec": (["inspect", "deit_small"], "timm:NAME"),
    "missing checkpoint": (["inspect", "test_cli:tiny_vit", "--checkpoint", "{bad}/missing.pt"], "does not exist"),
    "unreadable checkpoint": (["inspect", "test_cli:tiny_vit", "--checkpoint", "{bad}/garbage.pt"], "is not a checkpoint"),
    "text file as checkpoint": (["inspect", "test_cli:tiny_vit", "--checkpoint", "{bad}/passwd"],
                                "is not a checkpoint (safetensors or a torch.save file)"),
    "pickled objects": (["inspect", "test_cli:tiny_vit", "--checkpoint", "{bad}/objects.pt"], "weights_only"),
    "checkpoint misfit": (["inspect", "test_cli:tiny_vit", "--checkpoint", "{bad}/other_head.pt"], "does not fit"),
    "malformed input": (["inspect", "test_cli:tiny_vit", "--input", "1x3xbig"], "--input"),
    "wrong input size": (["inspect", "test_cli:tiny_vit", "--input", "1x3x64x64"], "expects"),
    "malformed kwargs": (["inspect", "test_cli:tiny_vit", "--kwargs", "{depth: 2}"], "--kwargs"),
    "at out of range": (["inspect", "test_cli:tiny_vit", "--at", "2"], "2 blocks were found"),
    "malformed at": (["inspect", "test_cli:tiny_vit", "--at", "one"], "--at"),
    "target above 1": (["inspect", "test_cli:tiny_vit", "--target-flops", "1.5"], r"(0, 1]"),
    "target zero": (["inspect", "test_cli:tiny_vit", "--target-flops", "0"], r"(0, 1]"),
    "target out of reach": (["inspect", "test_cli:tiny_vit", "--target-flops", "0.05", "--at", "1"],
                            "below what any schedule"),
    "keep and target": (["inspect", "test_cli:tiny_vit", "--keep", "0.5", "--target-flops", "0.5"], "not allowed"),
    "unreadable image": (["shiftmap", "test_cli:tiny_vit", "{bad}/garbage.pt", "--block", "0"], "cannot read image"),
}


def exit_code(argv) -> int:
    """main()'s return value, or the code argparse exits with."""
    try:
        return cli.main(argv)
    except SystemExit as stop:
        return stop.code


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(capsys, bad_files, case):
    argv, message = BAD[case]
    code = exit_code([a.replace("{bad}", str(bad_files)) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert message in err, err
    assert out == ""


def test_shiftmap_block_out_of_range(capsys, tmp_path):
    image = tmp_path / "gray.png"
    Image.new("RGB", (40, 40), (128, 128, 128)).save(image)
    code, _, err = run(capsys, "shiftmap", "test_cli:tiny_vit", image, "--block", "7")
    assert code == 2 and err.count("\n") == 1 and "2 blocks were found" in err


def test_debug_shows_the_traceback():
    with pytest.raises(SpecError, match="unknown timm model"):
        cli.main(["inspect", "timm:deit_smal", "--debug"])


def test_installed_command_exits_2_with_one_line():
    command = shutil.which("repshift-fx") or str(Path(sys.executable).parent / "repshift-fx")
    result = subprocess.run([command, "inspect", "timm:no_such_vit"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("repshift-fx inspect: error: unknown timm")


def test_torchvision_classifiers_get_their_preset_input_size(capsys):
    from repshift_fx.apps.specs import torchvision_input

    assert torchvision_input("torchvision:inception_v3") == (1, 3, 299, 299)
    assert torchvision_input("torchvision:fasterrcnn_resnet50_fpn") is None  # no crop size: --input needed
    assert torchvision_input("timm:resnet18") is None
    data = run_json(capsys, "inspect", "torchvision:resnet18")
    assert data["input"] == [1, 3, 224, 224] and data["mode"] == "lines"


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Fashion-MNIST: apt-get install dataset-fashion-mnist (bash tools/setup_env.sh test does)")
def test_tune_saves_what_inspect_config_uses(capsys, tmp_path):
    tuned = tmp_path / "tuned.json"
    code, out, err = run(capsys, "tune", *TINY, "--data", "fashion-mnist", "--samples", 16, "--batch", 8,
                         "--target-flops", 0.8, "--max-candidates", 2, "-o", tuned)
    assert code == 0, err
    saved = json.loads(tuned.read_text())
    assert saved["target_flops"] == 0.8 and len(saved["table"]) == 2 and "paper" in out
    data = run_json(capsys, "inspect", *TINY, "--config", tuned)
    assert data["flop_ratio"] <= 0.8 and data["config"]["keep"] == saved["config"]["keep"]
    assert any(note.startswith(f"configuration from calibration {tuned}") for note in data["notes"])
    code, _, err = run(capsys, "inspect", *TINY, "--config", tmp_path / "missing.json")
    assert code == 2 and "cannot read the calibration" in err and "Traceback" not in err
    code, _, err = run(capsys, "inspect", *TINY, "--config", tuned, "--keep", "0.5")  # would be ignored
    assert code == 2 and "--keep would be ignored" in err
    edited = tmp_path / "edited.json"
    for broken in ({k: v for k, v in saved.items() if k != "table"}, dict(saved, config=[1, 2]),
                   dict(saved, table=[dict(saved["table"][0], colour="red")])):
        edited.write_text(json.dumps(broken))
        code, _, err = run(capsys, "inspect", *TINY, "--config", edited)
        assert code == 2 and "is not a valid calibration" in err and "internal error" not in err, err


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Fashion-MNIST: apt-get install dataset-fashion-mnist (bash tools/setup_env.sh test does)")
def test_tune_with_labels_chooses_by_accuracy(capsys, tmp_path):
    tuned = tmp_path / "tuned.json"
    code, out, err = run(capsys, "tune", *TINY, "--data", "fashion-mnist", "--samples", 16, "--batch", 8,
                         "--target-flops", 0.8, "--max-candidates", 2, "--labels", "-o", tuned)
    assert code == 0, err
    saved = json.loads(tuned.read_text())
    assert saved["labelled"] and all(row["accuracy"] is not None for row in saved["table"] if not row["error"])
    assert "16 labelled samples" in out and "accuracy" in out


def test_shift_guidance_reaches_the_pass_and_needs_tome(capsys):
    data = run_json(capsys, "inspect", *TINY, "--score", "tome", "--r", "2", "--shift-guidance", "0.01")
    assert data["config"]["shift_guidance"] == 0.01 and data["config"]["score"] == "tome"
    code, _, err = run(capsys, "inspect", *TINY, "--shift-guidance", "0.01")
    assert code == 2 and "needs score='tome'" in err and "Traceback" not in err


def test_every_config_field_has_a_flag():
    """The flags are derived from Config: each field on inspect, bench and export, its Literal's
    words as the choices, and what they parse to is what compress() takes."""
    import argparse
    import dataclasses
    import typing

    from repshift_fx.config import Config

    commands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for command in ("inspect", "bench", "export"):
        flags = {action.dest: action for action in commands[command]._actions}
        for field in dataclasses.fields(Config):
            if field.name == "train":  # compress() in Python only: the command loads models for inference
                assert field.name not in flags
                continue
            assert field.name in flags, (command, field.name)
            hint = typing.get_type_hints(Config)[field.name]
            if typing.get_origin(hint) is typing.Literal:
                assert tuple(flags[field.name].choices) == typing.get_args(hint)
    args = cli.build_parser().parse_args([
        "inspect", "timm:any", "--keep", "0.5,0.7", "--at", "0,2", "--restore", "off", "--no-sdpa", "--protect", "1",
        "--reduce", "merge", "--merge-metric", "stream", "--size-attention", "qk", "--residual", "--distance", "l1"])
    assert cli._schedule(args) == {"keep": (0.5, 0.7), "at": (0, 2), "restore": False, "sdpa": False, "protect": 1,
                                   "reduce": "merge", "merge_metric": "stream", "size_attention": "qk",
                                   "residual": True, "distance": "l1"}
    args = cli.build_parser().parse_args(["inspect", "timm:any", "--keep", "0.5", "--at", "3", "--score", "tome",
                                          "--r", "8", "--shift-guidance", "0.01", "--restore", "on"])
    assert cli._schedule(args) == {"keep": 0.5, "at": (3,), "score": "tome", "r": 8, "shift_guidance": 0.01,
                                   "restore": True}
    assert cli._schedule(cli.build_parser().parse_args(["inspect", "timm:any"])) == {}  # Config's defaults


@pytest.mark.parametrize("flag,value,words", [("--keep", "0.7,,0.5", "must be a number"), ("--at", "1,", "whole numbers"),
                                              ("--input", "99999999x3x512x512", "more than this machine can allocate")])
def test_typos_in_flags_are_refused_not_read_around(capsys, flag, value, words):
    code, _, err = run(capsys, "inspect", *TINY, flag, value)
    assert code == 2 and words in err and "internal error" not in err, err


def test_tune_checks_where_it_writes_before_it_calibrates(capsys, tmp_path):
    code, _, err = run(capsys, "tune", *TINY, "--data", "fashion-mnist", "-o", tmp_path)
    assert code == 2 and "is a folder" in err and "internal error" not in err
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    code, _, err = run(capsys, "tune", *TINY, "--data", "fashion-mnist", "--target-flops", 0.8,
                       "-o", tmp_path / "t.json", "--plot", tmp_path / "notes.txt" / "x.png")
    assert code == 2 and "x.png: cannot write in" in err and "internal error" not in err, err
