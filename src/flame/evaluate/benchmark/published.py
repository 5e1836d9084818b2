"""The published numbers `flame eval --suite paper` prints beside a model's own (EVAL.md), as data:
one `Table` per table of the paper, each with the line of EVAL.md it comes from.

Values are percentages as published; a pair is (I2T, T2I) for retrieval; None where the source has
no number; a string where it gives a range. A column names the registry's benchmark, the metric
keys of its results (CLIP_benchmark's names) and, where the benchmark returns several results,
which one (`where`: fields the result must have). Nothing here is computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

R1 = ("text_retrieval_recall@1", "image_retrieval_recall@1")  # I2T, T2I as the paper orders them


@dataclass(frozen=True)
class Column:
    label: str
    benchmark: str
    metrics: tuple[str, ...]
    where: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    model: str
    data: str
    values: tuple  # per column: a float, a tuple of floats (one per metric), a string, or None


@dataclass(frozen=True)
class Table:
    title: str
    source: str
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]
    note: str = ""


LONG = Table(
    "Long-caption retrieval, R@1 (%) I2T / T2I, ViT-B/16",
    "EVAL.md section 1, 'Published numbers: long-caption R@1' (the paper's long-context table, release "
    "figures/long_context.png)",
    (Column("S4V-1k", "sharegpt4v-1k", R1), Column("Urban-1k", "urban-1k", R1), Column("DCI", "dci", R1),
     Column("DOCCI-test", "docci", R1)),
    (Row("CLIP", "CC3M", ((21.4, 20.2), (10.7, 9.6), (8.3, 7.5), (8.6, 7.0))),
     Row("Long-CLIP", "CC3M+S4V", ((51.3, 46.1), (15.5, 18.5), (13.8, 14.2), (14.7, 12.6))),
     Row("FLAME", "CC3M", ((85.6, 80.0), (65.3, 66.6), (50.8, 49.3), (54.5, 51.9))),
     Row("CLIP", "YFCC15M", ((57.1, 45.9), (30.4, 23.6), (22.0, 19.1), (26.5, 23.3))),
     Row("Long-CLIP", "YFCC15M+S4V", ((77.2, 77.6), (40.5, 46.1), (29.4, 29.7), (35.0, 33.5))),
     Row("FLAME", "YFCC15M", ((94.1, 93.2), (84.0, 87.9), (66.1, 68.1), (75.8, 76.2))),
     Row("CLIP", "WIT-400M", ((78.2, 79.6), (67.5, 53.3), (45.4, 43.0), (60.7, 57.0)))),
    "The published checkpoint (caj/FLAME-Mistral-Nemo-ViT-B-16-CC3M) should reproduce the FLAME CC3M row.",
)

MULTILINGUAL = Table(
    "Crossmodal-3600, mean R@1 over 36 languages (%) I2T / T2I",
    "EVAL.md section 2, 'Published numbers: multilingual' (the paper's radar figure, release "
    "figures/multilingual.png)",
    (Column("XM3600", "xm3600", R1, {"language": "mean"}),),
    (Row("FLAME (B/16)", "YFCC15M", ((51.72, 49.00),)),
     Row("mSigLIP", "multilingual WebLI", ((47.40, 34.40),)),
     Row("CLIP", "WIT-400M", ((7.37, 4.53),))),
    "No XM3600 number for FLAME-CC3M (the released checkpoint) was found; compare means only.",
)

SHORT = Table(
    "Short-caption retrieval, R@1 (%) I2T / T2I",
    "EVAL.md section 4, 'Published numbers' (the paper, as recorded in FLAME.md section 7)",
    (Column("COCO 5k", "coco", R1), Column("Flickr30k 1k", "flickr30k", R1)),
    (Row("FLAME (B/16)", "CC3M", ((43.3, 28.6), (67.3, 53.6))),),
    "Baseline rows were not found.",
)

_VARIANTS = (("ImageNet-V2", "imagenetv2"), ("ImageNet-A", "imagenet-a"), ("ImageNet-R", "imagenet-r"),
             ("ImageNet-Sketch", "imagenet-sketch"), ("ObjectNet", "objectnet"))
IMAGENET = Table(
    "Zero-shot classification, top-1 (%), ViT-B/16 on CC3M",
    "EVAL.md section 5, 'Published numbers' (FLAME.md section 7, from the paper)",
    (Column("ImageNet-1k", "imagenet1k", ("acc1",)),
     *(Column(label, name, ("acc1",)) for label, name in _VARIANTS)),
    (Row("FLAME", "CC3M", (36.0, None, None, None, None, None)),
     Row("CLIP", "CC3M", ("15.8-16.0", None, None, None, None, None)),
     Row("LaCLIP", "CC3M", (21.5, None, None, None, None, None))),
    "The paper's numbers for the ImageNet variants were not found.",
)

_SUGAR = (("replace-obj", "replace_obj"), ("replace-att", "replace_att"), ("replace-rel", "replace_rel"),
          ("swap-obj", "swap_obj"), ("swap-att", "swap_att"), ("add-obj", "add_obj"), ("add-att", "add_att"))
SUGARCREPE = Table(
    "SugarCrepe, accuracy (%)",
    "EVAL.md section 3, 'Published numbers: compositionality' (reference points for checking a reader, not FLAME)",
    (*(Column(label, "sugarcrepe", ("acc",), {"dataset": f"sugar_crepe/{s}"}) for label, s in _SUGAR),
     *(Column(c.capitalize(), "sugarcrepe", ("acc",), {"dataset": f"sugar_crepe/{c}"})
       for c in ("replace", "swap", "add"))),
    (Row("OpenAI CLIP ViT-B/32 (RAIVNLab/sugar-crepe issue #3)", "WIT-400M",
         (90.92, 80.08, 69.20, 61.38, 63.96, 77.20, 68.79, None, None, None)),
     Row("ViT-bigG-14 through CLIP_benchmark (LAION-AI/CLIP_benchmark PR #102)", "LAION-2B",
         (None, 88.1, None, None, None, 92.1, 84.5, None, None, None))),
    "FLAME's SugarCrepe numbers were not found in EVAL.md's sources: take them from the paper. Categories are "
    "micro-averages over their subsets.",
)

WINOGROUND = Table(
    "Winoground (%), the paper's strict scores",
    "EVAL.md section 3.2, 'Protocol' (chance levels; no published model row could be checked)",
    (Column("text", "winoground", ("text_score",)), Column("image", "winoground", ("image_score",)),
     Column("group", "winoground", ("group_score",))),
    (Row("chance", "-", (25.0, 25.0, 16.67)),),
    "FLAME's Winoground numbers were not found in EVAL.md's sources: take them from the paper.",
)

TABLES = (LONG, MULTILINGUAL, SHORT, IMAGENET, SUGARCREPE, WINOGROUND)
