"""`flame study`: the paper's claims measured on the demo's generated scenes, through the real
`flame embed` / `flame train` / evaluation path.

    flame study [--out runs/study] [--quick] [--llm SPEC] [--only data,long,facets,attention,negatives]

Parts (each a set of trained arms and the splits it scores; `flame.study.arms`):
  data       FLAME and the CLIP baseline, the same steps, on nested training sets of 4 sizes (500-4,000
             images, 4 per combination): retrieval and zero-shot against the size (plots/data_efficiency.png)
  long       FLAME (long set on captions whose details come after CLIP token 77) against CLIP cut at 77
             tokens, on the late captions and on the same captions with the details in front
  facets     FLAME against the raw prompt (1 facet), the short set (3), the long set (7) and all (10)
  attention  the long set read with facet-decoupled attention against one causal sequence
  negatives  each test image: its caption against the same caption with two attributes swapped
Every arm shares one set of evaluation splits (the smaller sets' combinations are a prefix of the
larger ones', and the test split comes from the smallest set's). Output: OUT/study.json, OUT/study.md,
OUT/plots/. Cached per stage (data, LLM dtype, stores, trainings, scores), like `flame demo`.

Modules: `settings` (what decides the numbers), `arms` (what each part trains and scores), `pipeline`
(the stages), `scoring` (one arm on its splits), `report` (tables and plots from the results).
"""

from __future__ import annotations

from pathlib import Path

from flame.errors import FlameError
from flame.fileio import write_atomic
from flame.study.settings import PARTS, Config, StudySettings

DESCRIPTION = ("Measure FLAME's claims on generated scenes: data efficiency against a CLIP baseline, long captions "
               "with their details after token 77, what 1/3/7/10 facets buy, facet-decoupled against causal "
               "attention, and swapped-attribute hard negatives. Writes OUT/study.json, OUT/study.md and plots; "
               "cached per stage.")


def main(cfg: Config) -> int:
    from flame.study.pipeline import OWN_MARK, Study

    out = Path(cfg.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / OWN_MARK).is_file())):
        raise FlameError(f"--out {out} exists and is not a flame study folder; choose a new or empty --out")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / OWN_MARK, "made by flame study: its data/, store/, runs/, cache/ are replaced when settings "
                 "change\n")
    Study(out, cfg.settings(), cfg.parts(), progress=cfg.progress).run()
    print((out / "study.md").read_text())
    return 0


__all__ = ["DESCRIPTION", "PARTS", "Config", "StudySettings", "main"]
