"""Every example runs, with tiny settings."""
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _run(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_compress_deit_example():
    out = _run("compress_deit.py", "--model", "deit_tiny_patch16_224", "--depth", "4", "--img-size", "64",
               "--batch", "2", "--rounds", "1")
    assert "tokens in" in out and "compressed compiled" in out and "the compiled baseline" in out


def test_compress_minilm_main_job(tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("a dog runs along the beach at sunset\nthe council voted to expand the bike lanes\n"
                     "heavy rain is expected over the weekend\nshe found letters in an old wooden box\n")
    out = _run("compress_minilm.py", "--texts", str(texts), "--rounds", "1")
    assert "4 texts padded to" in out and "tokens in" in out and "compressed compiled" in out
    rows = [line for line in out.splitlines()
            if line.startswith(("drop (the paper", "shift-merge", "ToMe (same", "ToMe on the stream", "ToMe by Ward"))]
    fidelity = {line.split("  ")[0]: line.split()[-3:] for line in rows if _numbers(line.split()[-3:])}
    assert len(fidelity) == 5
    for flops, mean, lowest in fidelity.values():
        assert 0 < float(flops) < 1 and -1 <= float(lowest) <= float(mean) <= 1


def _numbers(words) -> bool:
    try:
        return all(float(w) == float(w) for w in words)
    except ValueError:
        return False
