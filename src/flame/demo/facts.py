"""What the demo's pipeline and its report share: the output folder's layout, the result the
pipeline hands to the report, the split names, the summary table and the machine facts.

The report imports this module, never the pipeline: it receives a `DemoResult` and reads the
files the result points to.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from flame.runfolder import checkpoint_name

if TYPE_CHECKING:
    from flame.demo.settings import DemoSettings

SPLITS = ("test", "compositional", "paraphrase", "multilingual-fr", "multilingual-de", "multilingual-es")
MODELS = ("flame", "clip")


@dataclass(frozen=True)
class DemoPaths:
    """Where everything lives under OUT (one place for the folder's layout)."""

    out: Path

    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def store(self) -> Path:
        return self.out / "store"

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    @property
    def flame_run(self) -> Path:
        return self.runs / "flame"

    @property
    def clip_run(self) -> Path:
        return self.runs / "clip"

    @property
    def stages(self) -> Path:
        return self.out / "stages"

    @property
    def text_cache(self) -> Path:
        return self.out / "cache" / "text"

    @property
    def image_cache(self) -> Path:
        return self.out / "cache" / "images"

    def flame_checkpoint(self, steps: int) -> Path:
        return self.flame_run / checkpoint_name(steps)


@dataclass
class DemoResult:
    """What a finished pipeline hands to the report: its settings, where its outputs are, the
    metrics, the stage timings and the facts about the machine it ran on."""

    settings: DemoSettings
    paths: DemoPaths
    metrics: dict  # {model: {split: {metric: value}}}
    timings: dict[str, float]  # stage -> seconds, and "total"
    skipped: list[str]  # stages found cached
    llm: dict  # the LLM dtype measurement (dtype, float32 / bfloat16 tokens per second)
    machine: str
    date: str


def load_flame(paths: DemoPaths, steps: int):
    """The trained FLAME model (its text vectors cached under OUT/cache/text)."""
    from flame.model import FlameModel

    return FlameModel.from_pretrained(paths.flame_checkpoint(steps), cache_dir=paths.text_cache)


def load_clip(paths: DemoPaths):
    """-> (image side, text side) of the trained CLIP baseline."""
    from flame.baseline import load_baseline

    return load_baseline(paths.clip_run)


def summary_table(metrics: dict) -> str:
    """The side-by-side table (markdown): R@1/R@5 both ways per split, zero-shot top-1, chance."""
    rows = ["| split | FLAME I2T R@1 | FLAME T2I R@1 | CLIP I2T R@1 | CLIP T2I R@1 | FLAME I2T R@5 | FLAME T2I R@5 "
            "| CLIP I2T R@5 | CLIP T2I R@5 | chance R@1 |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    f, c = metrics["flame"], metrics["clip"]
    for split in ("test", "compositional", "paraphrase", "multilingual", *[s for s in SPLITS if "-" in s]):
        a, b = f[split], c[split]
        rows.append(f"| {split} | {a['i2t_r1']:.3f} | {a['t2i_r1']:.3f} | {b['i2t_r1']:.3f} | {b['t2i_r1']:.3f} | "
                    f"{a['i2t_r5']:.3f} | {a['t2i_r5']:.3f} | {b['i2t_r5']:.3f} | {b['t2i_r5']:.3f} | "
                    f"{a['chance_r1']:.3f} |")
    z, y = f["zeroshot"], c["zeroshot"]
    rows.append(f"| zero-shot top-1 | {z['top1']:.3f} | | {y['top1']:.3f} | | | | | | {z['chance']:.3f} |")
    return "\n".join(rows)


def machine() -> str:
    """CPU model, CPU count and OS, for the report's first line."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}"


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
