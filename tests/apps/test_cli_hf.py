"""`hf:` specs in the command: the packaged MiniLM (real weights) and save_pretrained directories,
text through --text / --text-file."""
import json

import pytest
import torch
import transformers

import repshift_fx
from repshift_fx.apps import cli
from repshift_fx.apps.hf import load_minilm
from test_cli import run, run_json

TEXT = "a brown dog runs along the beach"


@pytest.fixture(scope="module")
def tiny_vit_dir(tmp_path_factory):
    """A 2-layer transformers ViTModel (random weights, 32 px, patch 8) and its image processor."""
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_vit")
    transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                                   image_std=[0.5] * 3).save_pretrained(path)
    return path


def test_inspect_minilm_text(capsys):
    data = run_json(capsys, "inspect", "hf:minilm", "--text", TEXT)
    _, tokenizer = load_minilm()
    pieces = len(tokenizer(TEXT)["input_ids"])
    assert data["input"] == [1, pieces]
    assert len(data["blocks"]) == 6 and data["blocks"][0]["tokens_in"] == pieces
    assert data["blocks"][-1]["tokens_out"] < pieces and data["flop_ratio"] < 0.9
    code, out, _ = run(capsys, "inspect", "hf:minilm", "--text", TEXT)
    assert code == 0 and out.startswith(f"hf:minilm, input 1x{pieces} tokens") and "encoder.encoder.layer.5" in out


def test_inspect_text_file_batches_the_lines(capsys, tmp_path):
    lines = tmp_path / "texts.txt"
    lines.write_text(f"{TEXT}\n\nthe council voted on tuesday to expand the bike lanes\n")
    data = run_json(capsys, "inspect", "hf:minilm", "--text-file", lines)
    model, tokenizer = load_minilm()
    encoded = tokenizer([TEXT, "the council voted on tuesday to expand the bike lanes"], padding=True,
                        return_tensors="pt")
    assert data["input"] == list(encoded["input_ids"].shape)
    report = repshift_fx.inspect(model, (encoded["input_ids"], encoded["attention_mask"]))
    assert data["flop_ratio"] == pytest.approx(report.flop_ratio)


def test_inspect_hf_image_model_restores_every_token(capsys, tiny_vit_dir):
    data = run_json(capsys, "inspect", f"hf:{tiny_vit_dir}", "--at", "0")
    assert data["input"] == [1, 3, 32, 32]
    assert [b["tokens_in"] for b in data["blocks"]] == [17, 13] and data["flop_ratio"] < 1
    model = transformers.ViTModel.from_pretrained(tiny_vit_dir).eval()
    x = torch.randn(2, 3, 32, 32)
    same = repshift_fx.compress(model, x, keep=1.0, at=(0,), compile=False)
    with torch.no_grad():
        reference = model(pixel_values=x).last_hidden_state
        out = same(x)
    out = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0] if isinstance(out, tuple) else out
    assert out.shape == reference.shape and (out - reference).abs().max() / reference.abs().max() < 1e-5


def test_shiftmap_of_a_text(capsys, tmp_path):
    png = tmp_path / "words.png"
    code, out, err = run(capsys, "shiftmap", "hf:minilm", TEXT, "--block", "1", "-o", png)
    assert code == 0, err
    _, tokenizer = load_minilm()
    words = tokenizer.convert_ids_to_tokens(tokenizer(TEXT)["input_ids"])
    shown = [piece.rsplit(" ", 2) for piece in out.strip().split(" | ")]
    assert [s[0] for s in shown] == words
    dropped = sum(1 for piece in out.strip().split(" | ") if piece.endswith(" x"))
    assert dropped == len(words) - -(-7 * len(words) // 10)  # keep 0.7 of the word pieces
    assert png.stat().st_size > 500 and f"kept {len(words) - dropped} of {len(words)} word pieces" in err


def test_bench_text_model(capsys):
    code, out, err = run(capsys, "bench", "hf:minilm", "--text", TEXT, "--batch", "2", "--rounds", "1",
                         "--no-overhead", "--format", "json")
    assert code == 0, err
    data = json.loads(out)
    assert data["input"][0] == 2 and {r["variant"] for r in data["rows"]} >= {"baseline compiled", "compressed compiled"}


@pytest.mark.parametrize("argv,message", [
    (["inspect", "timm:deit_tiny_patch16_224", "--text", "a dog"], "--text is for text models"),
    (["inspect", "hf:/nowhere/at/all"], "save_pretrained"),
    (["inspect", "hf:minilm", "--checkpoint", "w.pt"], "--checkpoint does not apply"),
    (["inspect", "hf:minilm", "--text-file", "/nowhere.txt"], "cannot read --text-file"),
    (["shiftmap", "hf:minilm", "a dog", "--text", "a cat"], "give it as the argument after hf:minilm"),
])
def test_bad_hf_input_is_one_line(capsys, argv, message):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
