"""Shift maps: the Representation Shift of one block, read from the rewritten graph and drawn.

    smap = shift_map(model, x, block=3, keep=0.7)      # TokenMap (ViT), LineMap (CNN), TextMap (tokenizer=)
    draw(smap, photo, scale=2).save("map.png")

read.py reads the maps (every mode), draw.py draws them (every mode).
"""
from repshift_fx.apps.shiftmap.draw import GAP, STRIP, colormap, draw
from repshift_fx.apps.shiftmap.read import (LineMap, TextMap, TokenMap, grid, load_image, read_map,
                                                rewritten_values, shift_map)

__all__ = ["shift_map", "read_map", "rewritten_values", "draw", "colormap", "load_image", "grid", "TokenMap",
           "LineMap", "TextMap", "GAP", "STRIP"]
