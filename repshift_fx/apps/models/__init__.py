"""Models the examples, tools and tests share, with random weights: `vim` (a Vision Mamba in plain
PyTorch) and `zoo` (small models of many families, each with its example input). Import the
submodule you need; this package imports none of them."""
