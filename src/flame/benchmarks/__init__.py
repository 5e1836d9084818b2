"""`flame bench WHAT`: side-by-side performance figures. Each benchmark is a module here with a
`Config` (a `base.BenchConfig`: every one takes `--json FILE`), `run(cfg) -> dict` (the figures)
and `main(cfg)`, which prints them as a table and, with `--json FILE`, writes them to FILE."""

from __future__ import annotations

from flame.benchmarks import facets, gpu, recipes, store, train

ACTIONS = {
    "facets": (facets.Config, facets.main, "packed facet-decoupled pass vs K separate passes"),
    "gpu": (gpu.Config, gpu.main, "the whole GPU path in one run (--quick: tiny sizes, on a CPU too)"),
    "recipes": (recipes.Config, recipes.main, "exact accumulation and the four losses on a flame demo folder"),
    "store": (store.Config, store.main, "store size and random-access reads vs one .pth per sample"),
    "train": (train.Config, train.main, "training-step overhead and data-loader throughput"),
}
