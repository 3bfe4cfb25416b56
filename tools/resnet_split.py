"""Where a lines-mode ResNet-50 speedup goes: the unpruned front against the pruned back.

    python tools/resnet_split.py                      # batch 32, 2 threads, channels-last, compiled
    python tools/resnet_split.py --freezing --rows 20,21

torchvision resnet50 is cut after the drop block of the default schedule (`at=(4,)`, layer2.1):
the front (stem, layer1, layer2.0-1) runs on the full grid in both models; the back (layer2.2
to the classifier) runs on the full 28x28 grid in the baseline and on the kept rows x columns in
the pruned model. Each part is compiled on its own and timed interleaved (medians). With the back
taking exactly its FLOP share of time, the whole model's speedup / FLOP gain would be

    bound = (T_front + T_back) / (T_front + T_back * r_back) * flop_ratio

which is below 1 whenever the front runs at fewer FLOPs per ms than the back: the ceiling that
the unpruned front sets on what any pruning of the back can reach on this machine.
"""
from __future__ import annotations

import argparse
import functools
import statistics

import repshift_fx  # noqa: F401  (before torchvision: installs the torchvision guard)
import torch
import torchvision
from repshift_fx.compile.timing import time_variants
from repshift_fx.flops import per_sample_gmacs
from tabulate import tabulate


def split_resnet50(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(front, back) of a torchvision resnet50, cut after layer2.1: (B, 3, 224, 224) -> (B, 512, 28, 28)
    -> (B, 1000)."""
    front = torch.nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1,
                                model.layer2[0], model.layer2[1])
    back = torch.nn.Sequential(*model.layer2[2:], model.layer3, model.layer4, model.avgpool, torch.nn.Flatten(1),
                               model.fc)
    return front, back


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--rows", default="20,21", help="kept rows (= columns) of the 28x28 grid to time the back on")
    parser.add_argument("--freezing", action="store_true", help="Inductor freezing (BN folded into the convs)")
    args = parser.parse_args(argv)
    if args.freezing:
        from torch._inductor import config as inductor_config

        inductor_config.freezing = True
    torch.set_num_threads(args.threads)
    front, back = split_resnet50(torchvision.models.resnet50().eval().to(memory_format=torch.channels_last))
    grids = [28] + [int(r) for r in args.rows.split(",")]

    def maps(channels, size):
        return torch.randn(args.batch, channels, size, size).to(memory_format=torch.channels_last)

    inputs = {"front": (front, maps(3, 224))} | {f"back {g}x{g}": (back, maps(512, g)) for g in grids}
    with torch.inference_mode():
        gmacs = {name: per_sample_gmacs(part, (x,)) for name, (part, x) in inputs.items()}
    compiled = {front: torch.compile(front), back: torch.compile(back)}
    times = time_variants({name: functools.partial(compiled[part], x) for name, (part, x) in inputs.items()}, (),
                          rounds=args.rounds)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    print(tabulate([(name, f"{ms[name]:.1f}", f"{gmacs[name]:.3f}", f"{gmacs[name] * args.batch / ms[name]:.3f}")
                    for name in inputs], headers=("part", "ms/batch", "GMACs/img", "GMACs per ms")))
    base_ms, base_gmacs = ms["front"] + ms["back 28x28"], gmacs["front"] + gmacs["back 28x28"]
    rows = []
    for g in grids[1:]:
        name = f"back {g}x{g}"
        flop_ratio = (gmacs["front"] + gmacs[name]) / base_gmacs
        back_share = gmacs[name] / gmacs["back 28x28"]
        bound = base_ms / (ms["front"] + ms["back 28x28"] * back_share) * flop_ratio
        rows.append((f"{g}x{g}", f"{flop_ratio:.3f}", f"{ms[name] / ms['back 28x28']:.3f}", f"{back_share:.3f}",
                     f"{base_ms / (ms['front'] + ms[name]) * flop_ratio:.3f}", f"{bound:.3f}"))
    print(f"\nfront: {ms['front'] / base_ms:.3f} of the baseline's time, {gmacs['front'] / base_gmacs:.3f} of its FLOPs")
    print(tabulate(rows, headers=("kept grid", "FLOP ratio", "back time ratio", "back FLOP ratio",
                                  "speedup / FLOP gain", "bound (back at its FLOPs)")))


if __name__ == "__main__":
    main()
