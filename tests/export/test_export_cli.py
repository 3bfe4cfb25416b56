"""`repshift-fx export`: a tiny timm model to an ONNX file that onnxruntime runs at another batch size
like the eager compressed graph; bad input is one line and exit code 2."""
import repshift_fx  # noqa: F401  (before timm)

import json

import torch

from conftest import assert_close
from repshift_fx.apps.cli import main
from repshift_fx.apps.specs import load_model
from repshift_fx.export.runtime import session

SPEC, KWARGS = "timm:deit_tiny_patch16_224", {"depth": 3, "img_size": 32}


def test_export_writes_a_file_onnxruntime_runs_like_the_compressed_graph(tmp_path, capsys):
    path, weights = tmp_path / "deit.onnx", tmp_path / "weights.pt"
    model = load_model(SPEC, kwargs=KWARGS).model
    torch.save(model.state_dict(), weights)
    code = main(["export", SPEC, "--kwargs", json.dumps(KWARGS), "--checkpoint", str(weights), "--keep", "0.5",
                 "--at", "1", "-o", str(path)])
    assert code == 0
    assert "5 -> 3 tokens" in capsys.readouterr().out  # CLS + 4 patches, then CLS + ceil(0.5 * 4)
    x = torch.randn(3, 3, 32, 32)
    gm = repshift_fx.compress(model, x, keep=0.5, at=(1,), compile=False)
    got = session(path).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        assert_close(torch.from_numpy(got), gm(x), 1e-4)


def test_an_unwritable_output_is_one_line_and_exit_code_2(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    code = main(["export", SPEC, "--kwargs", json.dumps(KWARGS), "-o", str(tmp_path / "a_file" / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "repshift-fx export: error: cannot write" in err and len(err.strip().splitlines()) == 1


def test_bench_onnx_times_the_compressed_against_the_unpruned_onnx_model(capsys):
    code = main(["bench", SPEC, "--kwargs", json.dumps(KWARGS), "--batch", "2", "--rounds", "1", "--at", "1",
                 "--onnx", "--format", "json"])
    rows = {row["variant"]: row for row in json.loads(capsys.readouterr().out)["rows"]}
    assert code == 0 and set(rows) == {"baseline onnx", "compressed onnx"}
    assert rows["baseline onnx"]["flop_ratio"] == 1 and rows["compressed onnx"]["flop_ratio"] < 0.95
