"""Would another label-free objective have ranked MiniLM's calibration candidates by their test
accuracy? For every candidate of a saved calibrated evaluation (tools/evaluate.py --calibrate), its
sentence embeddings on the calibration texts are compared with the unpruned ones five ways, and
each measure's rank correlation (Spearman) with the test accuracy is printed:

- cosine: what calibration maximises;
- centred cosine: the cosine after subtracting the unpruned embeddings' mean (sentence embeddings
  share one large direction);
- whitened cosine: the cosine after whitening with the unpruned embeddings' covariance (Ledoit-Wolf
  shrinkage: 256 texts, 384 dimensions), so that every direction counts alike, as a probe may;
- retrieval: the share of texts whose nearest unpruned embedding is their own;
- neighbours: the share of texts whose nearest other text is the same as in the unpruned model.

    .venv/bin/python tools/calibration_objectives.py            # reads results/evaluate/minilm-wordnet-calibrated
"""
import argparse
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from sklearn.covariance import LedoitWolf
from tabulate import tabulate

import repshift_fx
from repshift_fx.apps import hf, hf_specs
from repshift_fx.apps.data.datasets import load_dataset
from repshift_fx.apps.evaluation.calibrated import calibration_texts
from repshift_fx.capture import reuse_traces


def test_accuracies(evaluate_md: Path) -> dict[str, float]:
    """Configuration label -> test accuracy %, from the table of a calibrated evaluation."""
    found = {}
    for line in evaluate_md.read_text().splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 7 and re.fullmatch(r"[0-9.]+", cells[6]):
            found[cells[2]] = float(cells[6])
    return found


def whitening(ref: torch.Tensor) -> torch.Tensor:
    """The inverse square root of the shrunk covariance of `ref` (samples x features)."""
    values, vectors = torch.linalg.eigh(torch.from_numpy(LedoitWolf().fit(ref.numpy()).covariance_))
    return vectors @ torch.diag(values.rsqrt()) @ vectors.T


def measures(out: torch.Tensor, ref: torch.Tensor, whiten: torch.Tensor) -> dict[str, float]:
    mean = ref.mean(0)
    centred_out, centred_ref = F.normalize(out - mean, dim=1), F.normalize(ref - mean, dim=1)
    similar = centred_out @ centred_ref.T
    own = torch.arange(len(ref))
    others, ref_others = similar.clone(), centred_ref @ centred_ref.T
    others[own, own] = ref_others[own, own] = -2
    return {"cosine": F.cosine_similarity(out, ref).mean().item(),
            "centred cosine": F.cosine_similarity(out - mean, ref - mean).mean().item(),
            "whitened cosine": F.cosine_similarity((out - mean) @ whiten, (ref - mean) @ whiten).mean().item(),
            "retrieval": (similar.argmax(1) == own).double().mean().item(),
            "neighbours": (others.argmax(1) == ref_others.argmax(1)).double().mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=Path("results/evaluate/minilm-wordnet-calibrated"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cal = repshift_fx.Calibration.load(args.run / "calibration.json")
    accuracy = test_accuracies(args.run / "evaluate.md")
    loaded = hf_specs.load_text_model("hf:minilm")
    texts, _ = calibration_texts(load_dataset("wordnet", "train", cal.samples), cal.samples)
    batches = hf.text_inputs(loaded.tokenizer, texts, 64, loaded.max_length)
    with torch.inference_mode():
        ref = torch.cat([loaded.model(**b) for b in batches]).double()
    whiten, rows = whitening(ref), []
    with reuse_traces(), torch.inference_mode():
        for c in (c for c in cal.table if c.error is None and c.label in accuracy):
            out = torch.cat([repshift_fx.compress(loaded.model, b, compile=False, **c.config)(**b) for b in batches])
            rows.append((c.label, accuracy[c.label], measures(out.double(), ref, whiten)))
    names = list(rows[0][2])
    print(tabulate([(label, acc, *(m[n] for n in names)) for label, acc, m in rows],
                   headers=("candidate", "test accuracy %", *names), floatfmt=".4f", tablefmt="github"))
    print(f"\nSpearman against the test accuracy over {len(rows)} candidates:")
    for name in names:
        print(f"  {name}: {spearmanr([m[name] for *_, m in rows], [a for _, a, _ in rows]).statistic:.3f}")


if __name__ == "__main__":
    main()
