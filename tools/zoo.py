"""The zoo sweep: every model prunes, or is refused in the user's words; never a wrong model.

    python tools/zoo.py                       # the default list below -> docs/zoo.md
    python tools/zoo.py --only deit,pit -o results/zoo.md

For each model (random weights, small inputs, compile=False): `inspect(keep=0.7)` for the FLOP
ratio, then `compress(keep=1.0)` against the model's own output (max relative error 1e-5) and
`compress(keep=0.7)` for the output shape. The outcome is "prunes" (FLOPs fall, keep=1.0 exact,
shape kept), "refused" (a RepShiftError; its message must name no node the pass inserted), or
"WRONG" / "CRASH" (a wrong answer, or an exception that is no RepShiftError): the targets are none.
"""
from __future__ import annotations

import argparse
import re
import time

import repshift_fx  # noqa: F401  (before timm: installs the torchvision guard)
import timm
import torch
from tabulate import tabulate
from tqdm import tqdm

TIMM = {  # name -> create_model kwargs (small, fast on 2 cores)
    "deit_tiny_patch16_224": dict(depth=4, img_size=64), "deit_tiny_distilled_patch16_224": dict(depth=4, img_size=64),
    "vit_small_patch14_reg4_dinov2": dict(depth=4, img_size=56), "vit_tiny_r_s16_p8_224": dict(img_size=64),
    "eva02_tiny_patch14_224": dict(depth=4, img_size=56), "beit_base_patch16_224": dict(depth=4, img_size=64),
    "cait_xxs24_224": dict(depth=4, img_size=64), "pit_ti_224": dict(img_size=112), "levit_128s": dict(img_size=96),
    "swin_tiny_patch4_window7_224": dict(depths=(2, 2), num_heads=(2, 4), img_size=112),
    "twins_pcpvt_small": dict(depths=(1, 1, 2, 2)), "convnext_atto": {}, "coat_lite_tiny": {},
    "mobilevit_xxs": dict(img_size=128), "volo_d1_224": {}, "xcit_nano_12_p16_224": dict(depth=4, img_size=64),
    "crossvit_tiny_240": {}, "resnet18": {},
}
INPUT = {"pit_ti_224": 112, "levit_128s": 96, "swin_tiny_patch4_window7_224": 112, "mobilevit_xxs": 128,
         "deit_tiny_patch16_224": 64, "deit_tiny_distilled_patch16_224": 64, "vit_small_patch14_reg4_dinov2": 56,
         "vit_tiny_r_s16_p8_224": 64, "eva02_tiny_patch14_224": 56, "beit_base_patch16_224": 64,
         "cait_xxs24_224": 64, "xcit_nano_12_p16_224": 64, "crossvit_tiny_240": 240}
INSERTED = re.compile(r"repshift_(score|index|keep|merge|merged|assign|size|match|metric|restore|padding|real_score)_\d")


def _first(out):
    if isinstance(out, dict):
        out = next(iter(out.values()))
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def check(model, x) -> dict:
    """One model's outcome, FLOP ratio and reason."""
    with torch.no_grad():
        want = _first(model(x))
    try:
        report = repshift_fx.inspect(model, x, keep=0.7)
        ratio = report.flop_ratio
        full = _first(repshift_fx.compress(model, x, keep=1.0, compile=False)(x))
        pruned = _first(repshift_fx.compress(model, x, keep=0.7, compile=False)(x))
    except repshift_fx.RepShiftError as err:
        bad = INSERTED.search(str(err))
        return {"outcome": "refused" if not bad else "refused (names an inserted node)", "ratio": None,
                "reason": f"{type(err).__name__}: {str(err)[:240]}"}
    except Exception as err:  # noqa: BLE001 - a crash is what the sweep is here to find
        return {"outcome": "CRASH", "ratio": None, "reason": f"{type(err).__name__}: {str(err)[:240]}"}
    error = ((full - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
    if error > 1e-5 or pruned.shape != want.shape:
        return {"outcome": "WRONG", "ratio": ratio, "reason": f"keep=1.0 relative error {error:.2g}, shape "
                f"{tuple(pruned.shape)} vs {tuple(want.shape)}"}
    warning = next((note for note in report.notes if note.startswith("nothing is pruned")), "")
    return {"outcome": "prunes" if ratio < 0.999 else "prunes nothing (warns)", "ratio": ratio, "reason": warning}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated substrings of the model names to run")
    parser.add_argument("-o", "--out", default="docs/zoo.md")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [n for n in TIMM if not args.only or any(s in n for s in args.only.split(","))]
    rows, start = [], time.time()
    for name in tqdm(names, desc="zoo", unit="model"):
        torch.manual_seed(0)
        try:
            model = timm.create_model(name, **TIMM[name]).eval()
        except Exception as err:  # noqa: BLE001 - a config this timm does not take
            rows.append((f"timm:{name}", "skipped", "-", f"create_model: {str(err)[:120]}"))
            continue
        size = INPUT.get(name, 224)
        result = check(model, torch.randn(2, 3, size, size))
        rows.append((f"timm:{name}", result["outcome"], "-" if result["ratio"] is None else f"{result['ratio']:.3f}",
                     result["reason"].replace("|", "/").replace("\n", " ")))
    table = tabulate(rows, headers=("model", "outcome", "FLOP ratio at keep 0.7", "reason"), tablefmt="github")
    text = (f"# Zoo sweep\n\n`python tools/zoo.py` (random weights, keep 0.7, default `at`, restore='auto', "
            f"compile=False; {len(rows)} models in {time.time() - start:.0f} s on {args.threads} threads)\n\n{table}\n")
    with open(args.out, "w") as f:
        f.write(text)
    print(table)


if __name__ == "__main__":
    main()
