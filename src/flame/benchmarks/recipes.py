"""`flame bench recipes`: exact accumulation and the four losses, trained and evaluated side by side
on a `flame demo` folder's data (its generated scenes and its SmolLM2 facet store).

Every run is the demo's FLAME recipe (`flame.demo.settings.DemoSettings`: vit-tiny at 64 px,
pool-first projector, lr 1e-3, the anisotropic initial t) for `--steps` steps, evaluated with
`flame.evaluate` on the demo's `test` retrieval split (image->text and text->image R@1) and its
zero-shot classification split (top-1). The runs:

- mp-sigmoid, batch `--batch-size` (the reference);
- mp-sigmoid, batch `--batch-size / --accum` x `--accum` accumulation: the same global batch and
  the same samples, so the same numbers within noise (the gradients are equal up to float
  summation order; tests/unit/test_accumulation.py);
- mp-softmax, siglip and clip at the reference batch.

The evaluation texts are read from the demo's text cache (`flame demo` filled it); texts not in
it are encoded with the demo's LLM. Runs go to `--out` (default DEMO/bench-recipes) and a
finished run is reused.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from flame.benchmarks.base import BenchConfig, report
from flame.config import at_least, setting
from flame.errors import FlameError

SPLITS = ("test", "zeroshot")


@dataclass
class Config(BenchConfig):
    """`flame bench recipes` settings."""

    demo: Path = setting(Path("runs/demo"), help="a flame demo output folder (its data, store and text cache)")
    out: Path | None = setting(None, shown="DEMO/bench-recipes", help="folder of the runs")
    steps: int = setting(200, check=at_least(1), help="training steps of every run")
    batch_size: int = setting(48, check=at_least(1), help="the global batch of every run")
    accum: int = setting(4, check=at_least(2), help="micro-steps of the accumulated run")
    only: list[str] = setting([], metavar="RUN", help="train and report only these runs (e.g. clip-b48; "
                                                      "several processes can each train some, in parallel)")

    def check(self) -> None:
        if self.batch_size % self.accum:
            raise FlameError(f"--batch-size {self.batch_size} is not a multiple of --accum {self.accum}")


def main(cfg: Config) -> int:
    return report("recipes", run(cfg), cfg.json)


def variants(cfg: Config) -> dict[str, dict]:
    micro = cfg.batch_size // cfg.accum
    runs = {
        f"mp-sigmoid-b{cfg.batch_size}": {"loss": "mp-sigmoid", "batch_size": cfg.batch_size, "accum": 1},
        f"mp-sigmoid-b{micro}x{cfg.accum}": {"loss": "mp-sigmoid", "batch_size": micro, "accum": cfg.accum},
        **{f"{loss}-b{cfg.batch_size}": {"loss": loss, "batch_size": cfg.batch_size, "accum": 1}
           for loss in ("mp-softmax", "siglip", "clip")},
    }
    unknown = sorted(set(cfg.only) - set(runs))
    if unknown:
        raise FlameError(f"--only {', '.join(unknown)}: no such run (the runs: {', '.join(runs)})")
    return {k: v for k, v in runs.items() if not cfg.only or k in cfg.only}


def train_config(cfg: Config, out: Path, loss: str, batch_size: int, accum: int):
    from flame.demo.settings import DemoSettings
    from flame.train import TrainConfig, validate

    s = DemoSettings()
    return validate(TrainConfig(
        data=[str(cfg.demo / "data" / "train")], embeddings=str(cfg.demo / "store"), out=str(out), tower=s.tower,
        image_size=s.image_size, proj_hidden=s.proj_hidden, pool_first=s.pool_first,
        init_logit_scale=s.init_logit_scale, batch_size=batch_size, accum=accum, loss=loss, steps=cfg.steps,
        lr=s.lr, warmup=s.warmup, weight_decay=s.weight_decay, workers=0, device="cpu", seed=s.seed,
        log_every=max(1, cfg.steps // 4), save_every=cfg.steps, keep=1, tensorboard=False, progress=False,
        resume="latest"))


def evaluate_run(cfg: Config, checkpoint: Path) -> dict:
    from flame.demo.settings import DemoSettings
    from flame.evaluate import evaluate, load_dataset
    from flame.model import FlameModel

    model = FlameModel.from_pretrained(checkpoint, cache_dir=cfg.demo / "cache" / "text")
    figures = {}
    for split in SPLITS:
        task = "zeroshot-classification" if split == "zeroshot" else "retrieval"
        ds = load_dataset(cfg.demo / "data" / "eval" / split, task=task)
        r = evaluate(model, ds, task=task, prompts=DemoSettings.eval_prompts, workers=0,
                     cache_dir=cfg.demo / "cache" / "images", progress=False)
        m, images = r["metrics"], r["images"] - r.get("skipped_images", 0)
        if split == "zeroshot":
            figures["zeroshot_top1"] = m["acc1"]
        else:
            figures.update({f"{split}_i2t_r1": m["text_retrieval_recall@1"],
                            f"{split}_t2i_r1": m["image_retrieval_recall@1"], f"{split}_images": images})
    return figures


def run(cfg: Config) -> dict:
    from flame.runfolder import checkpoint_name
    from flame.train import train

    if not (cfg.demo / "store" / "manifest.json").is_file():
        raise FlameError(f"--demo {cfg.demo} holds no flame demo output (run `flame demo --out {cfg.demo}` first)")
    root = cfg.out or cfg.demo / "bench-recipes"
    figures: dict = {"steps": cfg.steps}
    for name, v in variants(cfg).items():
        out = root / name
        final = out / checkpoint_name(cfg.steps)
        took = None
        if not (final / "model.safetensors").is_file():
            t0 = time.perf_counter()
            if train(train_config(cfg, out, **v)):
                raise FlameError(f"training {name} failed")
            took = time.perf_counter() - t0
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
        result = {**evaluate_run(cfg, final), "final_loss": log[-1]["loss"]}
        if took is not None:
            result["train_s"] = round(took, 1)
        figures.update({f"{name}: {k}": value for k, value in result.items()})
    n = next(v for k, v in figures.items() if k.endswith("test_images"))
    figures["r1_standard_error_at_0.5"] = math.sqrt(0.25 / n)  # the binomial noise of one R@1 on n images
    return figures
