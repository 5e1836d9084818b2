"""`flame demo`: the whole pipeline on a generated scenes set, FLAME beside a CLIP baseline.

    flame demo [--out flame-demo] [--quick] [--llm smollm2-135m] [--seed 0]

Stages (each skipped when its output exists with the same settings, so a second run only
re-evaluates from cached vectors and rewrites the report):
  1 data      flame.data.scenes: train / test / compositional / paraphrase / multilingual / zero-shot
  2 llm       load the LLM once, pick its dtype by timing fp32 against bf16 on this machine
  3 embed     `flame embed` on the train shard: short set on the short caption, long set on the long one
  4 train     `flame train`: the image tower against the stored facet vectors
  5 clip      flame.baseline: the same image tower and stream with open_clip's text transformer + ClipLoss
  6 eval      flame.evaluate on every split, for both models (same metric code)
  7 report    OUT/metrics.json, OUT/report.md, OUT/plots/*.png

Modules: `settings` (what decides the numbers), `pipeline` (the stages in order), `evaluation`
(stage 6), `report` (stage 7: it receives a `facts.DemoResult`, never the pipeline), `facts`
(what both share: the folder layout, the result, the summary table), `stages` (progress lines
and cache markers), `measure` (LLM dtype timing, token counts for the estimates).

The raw prompt set is not embedded separately: here the raw and the short caption are the same
text, and with restart positions the raw set's single facet *is* the short set's first facet
(same prefix, same facet prompt), so storing it again would only cost LLM time.
"""

from __future__ import annotations

from flame.demo.facts import MODELS, SPLITS, DemoPaths, DemoResult, machine, now, summary_table
from flame.demo.measure import measure_llm
from flame.demo.pipeline import Demo, main
from flame.demo.settings import QUICK, Config, DemoSettings

DESCRIPTION = ("Generate a scenes dataset, embed its captions with the built-in LLM, train a small ViT on the CPU "
               "with FLAME and a CLIP baseline with the same image tower, evaluate both on every split and write "
               "OUT/metrics.json, OUT/report.md and plots. Cached: a second run only re-evaluates.")

__all__ = ["DESCRIPTION", "MODELS", "QUICK", "SPLITS", "Config", "Demo", "DemoPaths", "DemoResult", "DemoSettings",
           "machine", "main", "measure_llm", "now", "summary_table"]
