"""`flame demo`'s command-line settings (`Config`) and what decides its numbers (`DemoSettings`);
`Config.settings()` is the one place where `--quick` and the flags turn into the latter."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from flame.config import at_least, setting


@dataclass
class DemoSettings:
    """Everything that decides the demo's numbers; each stage's configuration is built from it."""

    seed: int = 0
    llm: str = "smollm2-135m"
    layer: str = "-2"
    train_images: int = 4000
    combos: int = 1000
    eval_size: int = 80
    zeroshot: int = 500
    tower: str = "vit-tiny"
    image_size: int = 64
    proj_hidden: int = 512
    pool_first: bool = True
    init_logit_scale: str = "auto"  # SmolLM2's facet vectors sit in a narrow cone (mean cosine 0.91)
    steps: int = 2000
    batch_size: int = 48
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.0
    eval_prompts: str = "raw"
    clip_text: dict = field(default_factory=lambda: {"context_length": 32, "width": 128, "heads": 4, "layers": 3})

    def scenes(self):
        """The generated data set's configuration (`flame.data.scenes.ScenesConfig`)."""
        from flame.data.scenes import ScenesConfig

        return ScenesConfig(seed=self.seed, train=self.train_images, combos=self.combos, eval_size=self.eval_size,
                            zeroshot=self.zeroshot, image_size=self.image_size)


# `--quick`: a smoke version that runs in minutes (the tests use it)
QUICK = dict(train_images=640, combos=64, eval_size=48, zeroshot=60, steps=120, batch_size=32, warmup=10)


@dataclass
class Config:
    """`flame demo` settings: what the user chooses; everything else is `DemoSettings`."""

    out: Path = setting(Path("runs/demo"), help="output folder")
    quick: bool = setting(False, help="a small smoke version (minutes; used by the tests)")
    llm: str = setting(DemoSettings.llm, check=(bool, "must not be empty"), shown=f"{DemoSettings.llm}, built in",
                       help="LLM spec for the text side")
    layer: str = setting(DemoSettings.layer, check=(bool, "must not be empty"),
                         help="decoder block(s) for the embeddings")
    seed: int = setting(DemoSettings.seed, help="seed of the generated data and of training")
    steps: int | None = setting(None, check=at_least(1), shown=f"{DemoSettings.steps}; --quick {QUICK['steps']}",
                                help="training steps for both models")
    progress: bool = setting(True, negate="--no-progress", help="no progress bars")

    def settings(self) -> DemoSettings:
        """The demo's settings: defaults, then the `--quick` preset, then the flags."""
        s = DemoSettings(seed=self.seed, llm=self.llm, layer=self.layer)
        if self.quick:
            s = replace(s, **QUICK)
        if self.steps is not None:
            s = replace(s, steps=self.steps)
        return s
