"""`flame study`'s command-line settings (`Config`) and what decides its numbers (`StudySettings`);
`Config.settings()` is the one place where `--quick` and the flags turn into the latter."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from flame.config import at_least, setting
from flame.demo.settings import DemoSettings
from flame.errors import FlameError

PARTS = ("data", "long", "facets", "attention", "negatives")


@dataclass
class StudySettings:
    """The demo's recipe (`base`: tower, batch, learning rate, LLM, seeds) with the study's own sizes.
    Every arm trains `base.steps` steps; the training sets hold `images_per_combo` images of each of
    their combinations, so a larger set also has more distinct captions."""

    base: DemoSettings = field(default_factory=lambda: replace(DemoSettings(), steps=1000))
    sizes: tuple[int, ...] = (500, 1000, 2000, 4000)
    images_per_combo: int = 4

    def __post_init__(self):
        if len(self.sizes) < 1 or any(n % self.images_per_combo for n in self.sizes):
            raise FlameError(f"study sizes {self.sizes} must each be a multiple of {self.images_per_combo}")
        if self.base.eval_size > self.sizes[0] // self.images_per_combo:
            raise FlameError(f"eval_size {self.base.eval_size} exceeds the smallest set's combinations")

    @property
    def largest(self) -> int:
        return max(self.sizes)

    def scenes(self, size: int):
        """The training set of `size` images. Every size draws its test split from the smallest set's
        combinations, which every larger set contains, so all sizes share one set of evaluation splits."""
        from flame.data.scenes import ScenesConfig

        b = self.base
        return ScenesConfig(seed=b.seed, train=size, combos=size // self.images_per_combo, eval_size=b.eval_size,
                            zeroshot=b.zeroshot, image_size=b.image_size, study=True,
                            test_combos=min(self.sizes) // self.images_per_combo)


# `--quick`: a smoke version that runs in minutes (the test runs it end to end)
QUICK_BASE = dict(eval_size=12, zeroshot=30, steps=20, batch_size=16, warmup=5)
QUICK_SIZES = (64, 128)


@dataclass
class Config:
    """`flame study` settings: what the user chooses; everything else is `StudySettings`."""

    out: Path = setting(Path("runs/study"), help="output folder (cached per stage: a rerun redoes only what changed)")
    quick: bool = setting(False, help="a small smoke version (minutes; used by the tests)")
    llm: str = setting(DemoSettings.llm, check=(bool, "must not be empty"), shown=f"{DemoSettings.llm}, built in",
                       help="LLM spec for the text side (a folder, a GGUF file or a hub id)")
    only: str = setting(",".join(PARTS), metavar="PART,...",
                        check=(lambda v: bool(v) and set(v.split(",")) <= set(PARTS), f"must be a comma list of "
                               f"{', '.join(PARTS)}"),
                        help="which parts to run: data (data-efficiency curves), long (details after token 77), "
                             "facets (1/3/7/10 facets), attention (facet-decoupled against causal), negatives "
                             "(swapped-attribute captions)")
    seed: int = setting(0, help="seed of the generated data and of training")
    steps: int | None = setting(None, check=at_least(1), shown="1000; --quick 20",
                                help="training steps of every arm")
    progress: bool = setting(True, negate="--no-progress", help="no progress bars")

    def parts(self) -> tuple[str, ...]:
        chosen = set(self.only.split(","))
        return tuple(p for p in PARTS if p in chosen)

    def settings(self) -> StudySettings:
        base = replace(StudySettings().base, seed=self.seed, llm=self.llm)
        sizes = StudySettings.sizes
        if self.quick:
            base, sizes = replace(base, **QUICK_BASE), QUICK_SIZES
        if self.steps is not None:
            base = replace(base, steps=self.steps)
        return StudySettings(base=base, sizes=sizes)
