"""What decides the demo's numbers (`DemoSettings`), and the `--quick` preset."""

from __future__ import annotations

from dataclasses import dataclass, field


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
