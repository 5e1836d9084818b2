"""FLAME models inside other projects' own tools (`clip_benchmark`: CLIP_benchmark's `eval` command).

A stage-layer package: it may use the library (`flame.factory`, `flame.model`); nothing in FLAME
imports it, so a missing third-party tool never affects `flame` itself.
"""
