"""Graph passes, one per file, each `run(gm, ctx) -> gm` (installed as `repshift_fx.passes`).

The order they run in is `repshift_fx.pipeline.PASSES`.
"""
