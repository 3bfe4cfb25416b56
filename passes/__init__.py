"""Graph passes, one per file, each `run(gm, ctx) -> gm` (installed as `repshift_fx.passes`).

The order they run in is each mode's: `repshift_fx.modes.TOKENS.rewrite_passes`, `...LINES.rewrite_passes`
(repshift_fx/modes/), driven by the one pipeline in repshift_fx/pipeline.py.
"""
