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

The raw prompt set is not embedded separately: here the raw and the short caption are the same
text, and with restart positions the raw set's single facet *is* the short set's first facet
(same prefix, same facet prompt), so storing it again would only cost LLM time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from flame.errors import FlameError
from flame.fileio import write_atomic

log = logging.getLogger("flame.demo")

SPLITS = ("test", "compositional", "paraphrase", "multilingual-fr", "multilingual-de", "multilingual-es")
MODELS = ("flame", "clip")


@dataclass
class DemoSettings:
    """Everything that decides the demo's numbers (the cache keys of every stage)."""

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
        from flame.data.scenes import ScenesConfig

        return ScenesConfig(seed=self.seed, train=self.train_images, combos=self.combos, eval_size=self.eval_size,
                            zeroshot=self.zeroshot, image_size=self.image_size)

    def subset(self, *names: str) -> dict:
        """The settings a stage depends on, with the generator's version (new data, new stages)."""
        d = asdict(self)
        return {**{k: d[k] for k in names}, "data": self.scenes().to_dict()}


QUICK = dict(train_images=640, combos=64, eval_size=48, zeroshot=60, steps=120, batch_size=32, warmup=10)
DATA_KEYS = ("seed", "train_images", "combos", "eval_size", "zeroshot", "image_size")
EMBED_KEYS = DATA_KEYS + ("llm", "layer")
TRAIN_KEYS = EMBED_KEYS + ("tower", "proj_hidden", "pool_first", "init_logit_scale", "steps", "batch_size", "lr",
                          "warmup", "weight_decay")
CLIP_KEYS = TRAIN_KEYS + ("clip_text",)


# ---- stage bookkeeping --------------------------------------------------------------------
def _clock(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 60}:{s % 60:02d}"


class Stages:
    """One line per stage: what runs, how long it took, and an estimate of what is left
    (each stage's estimate is refined as measurements come in)."""

    def __init__(self, out: Path, estimates: dict[str, float]):
        self.out = out
        self.estimates = dict(estimates)
        self.t0 = time.perf_counter()
        self.times: dict[str, float] = {}
        self.skipped: list[str] = []
        self.current: str | None = None
        self.start = 0.0

    def left(self) -> float:
        return sum(v for k, v in self.estimates.items() if k not in self.times and k != self.current)

    def begin(self, name: str, what: str) -> None:
        self.current, self.start = name, time.perf_counter()
        n = list(self.estimates).index(name) + 1
        guess = self.estimates.get(name, 0)
        print(f"[{n}/{len(self.estimates)}] {name}: {what} (about {_clock(guess)}; "
              f"elapsed {_clock(time.perf_counter() - self.t0)}, about {_clock(guess + self.left())} left)",
              flush=True)

    def end(self, note: str = "", skipped: bool = False) -> None:
        name = self.current
        took = time.perf_counter() - self.start
        self.times[name] = took
        if skipped:
            self.skipped.append(name)
        self.current = None
        print(f"      {name}: {'cached, skipped' if skipped else 'done'} in {_clock(took)}{'; ' + note if note else ''}"
              f" (elapsed {_clock(time.perf_counter() - self.t0)}, about {_clock(self.left())} left)", flush=True)

    def marker(self, name: str) -> Path:
        return self.out / "stages" / f"{name}.json"

    def done_with(self, name: str, settings: dict) -> bool:
        try:
            return json.loads(self.marker(name).read_text()) == json.loads(json.dumps(settings))
        except (OSError, ValueError):
            return False

    def mark(self, name: str, settings: dict) -> None:
        self.marker(name).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.marker(name), json.dumps(settings, indent=2) + "\n")


# ---- LLM dtype by measurement --------------------------------------------------------------
def measure_llm(spec: str, sample: list[str]) -> dict:
    """Time the facet encoder on `sample` in fp32 and bf16 on this CPU; return the faster dtype
    and its tokens/s (bf16 is fast only with AMX / AVX-512 BF16; on AVX2 it was 6x slower)."""
    import torch

    from flame.facets import FacetEncoder
    from flame.llm import load_llm

    model, tok = load_llm(spec, device="cpu", dtype=torch.float32)
    result = {"threads": torch.get_num_threads(), "float32": 0.0, "bfloat16": 0.0}
    # two interleaved rounds, best of each: a busy machine slows one probe, not a whole dtype
    for _ in range(2):
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            model.to(dtype)
            enc = FacetEncoder(model, tok, prompts="long", layer=-2)
            enc.encode(sample[:1])  # warm-up
            enc.tokens, t = 0, time.perf_counter()
            enc.encode(sample)
            result[name] = max(result[name], enc.tokens / max(time.perf_counter() - t, 1e-9))
    result["dtype"] = max(("float32", "bfloat16"), key=lambda k: result[k])
    result["tokens_per_s"] = result[result["dtype"]]
    del model
    return result


def _prompt_tokens(spec: str, captions: dict[str, list[str]]) -> int:
    """LLM tokens the packed facet pass will run for these distinct captions, per prompt set."""
    from flame.prompts import PROMPT_SETS, clean_caption

    tok = _tokenizer(spec)
    total = 0
    for set_name, caps in captions.items():
        ps = PROMPT_SETS[set_name]
        extra = sum(len(tok(f, add_special_tokens=False)["input_ids"]) for f in ps.facets)
        for c in dict.fromkeys(caps):
            total += len(tok(ps.prefix.replace("{cap}", clean_caption(c)))["input_ids"]) + extra
    return total


def _tokenizer(spec: str):
    from transformers import AutoTokenizer

    from flame.llm import _resolve

    source, local = _resolve(spec)
    return AutoTokenizer.from_pretrained(source, local_files_only=local)


# ---- the run --------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Generate a scenes dataset, embed its captions with the built-in LLM, train a small ViT on "
                     "the CPU with FLAME and a CLIP baseline with the same image tower, evaluate both on every "
                     "split and write OUT/metrics.json, OUT/report.md and plots. Cached: a second run only "
                     "re-evaluates.")
    p.add_argument("--out", default="runs/demo", type=Path, help="output folder (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="a small smoke version (minutes; used by the tests)")
    p.add_argument("--llm", default=None, help="LLM spec for the text side (default: smollm2-135m, built in)")
    p.add_argument("--layer", default=None, help="decoder block(s) for the embeddings (default -2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated data and of training (default 0)")
    p.add_argument("--steps", type=int, default=None, help="training steps for both models (default 2000; quick 120)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    s = DemoSettings(seed=args.seed)
    if args.quick:
        s = replace(s, **QUICK)
    if args.llm:
        s = replace(s, llm=args.llm)
    if args.layer:
        s = replace(s, layer=str(args.layer))
    if args.steps:
        if args.steps < 1:
            raise FlameError("--steps must be >= 1")
        s = replace(s, steps=args.steps)
    return s


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise FlameError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return Demo(out, settings, progress=args.progress).run()


class Demo:
    def __init__(self, out: Path, settings: DemoSettings, progress: bool = True):
        self.out, self.s, self.progress = out, settings, progress
        self.data = out / "data"
        self.store = out / "store"
        self.flame_run = out / "runs" / "flame"
        self.clip_run = out / "runs" / "clip"
        self.llm_info: dict = {}

    # rough first guesses (seconds on an idle 2-core CPU), refined by measurements on the way
    def _estimates(self) -> dict[str, float]:
        s = self.s
        imgs = s.train_images + 2 * s.eval_size + s.zeroshot
        return {"data": imgs * 0.006, "llm": 15.0, "embed": s.combos * 255 / 300, "train": s.steps * s.batch_size / 400,
                "clip": s.steps * s.batch_size / 300, "eval": 15 + s.eval_size * 320 / 300, "report": 5.0}

    def run(self) -> int:
        import torch

        st = Stages(self.out, self._estimates())
        threads = torch.get_num_threads()
        print(f"flame demo -> {self.out} ({self.s.train_images} training images, {self.s.steps} steps; "
              f"{os.cpu_count()} CPUs, torch threads {threads})", flush=True)
        self._data(st)
        self._llm(st)
        self._embed(st)
        self._train(st)
        self._clip(st)
        metrics = self._eval(st)
        st.begin("report", "metrics.json, report.md, plots")
        from flame.demo_report import write_report

        timings = {k: round(v, 1) for k, v in st.times.items()}
        timings["total"] = round(time.perf_counter() - st.t0, 1)
        write_report(self, metrics, timings, st.skipped)
        st.end()
        print(f"flame demo: total {_clock(time.perf_counter() - st.t0)}; report in {self.out / 'report.md'}")
        print(summary_table(metrics))
        return 0

    # 1 ----------------------------------------------------------------------------------------
    def _data(self, st: Stages) -> None:
        from flame.data import scenes

        config = self.s.scenes()
        st.begin("data", f"{config.train} training images of {config.combos} captioned combinations + eval splits")
        if scenes.settings_match(self.data, config):
            st.end(skipped=True)
            return
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=config.train + 2 * config.eval_size + config.zeroshot, unit="img", desc="scenes",
                       dynamic_ncols=True, disable=None)
        scenes.write_dataset(self.data, config, progress=bar.update if bar else None)
        if bar:
            bar.close()
        for stale in (self.store, self.out / "runs", self.out / "cache" / "images"):  # made from other data
            shutil.rmtree(stale, ignore_errors=True)
        st.end()

    def _train_captions(self) -> dict[str, list[str]]:
        from flame.data import scenes

        p = scenes.plan(self.s.scenes())
        return {"short": [scenes.short_caption(c) for c in p.combos],
                "long": [scenes.long_caption(c) for c in p.combos]}

    # 2 ----------------------------------------------------------------------------------------
    def _llm(self, st: Stages) -> None:
        st.begin("llm", f"load {self.s.llm}, time fp32 against bf16 on this CPU")
        need = not (st.done_with("embed", self.s.subset(*EMBED_KEYS)) and self._eval_texts_cached())
        path = self.out / "stages" / "llm.json"
        key = {"llm": self.s.llm, "cpu": platform.processor() or platform.machine(), "python": sys.version.split()[0]}
        try:
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                self.llm_info = saved
        except (OSError, ValueError):
            pass
        if not need or self.llm_info:
            st.end(skipped=True, note=f"dtype {self.llm_info.get('dtype', 'float32')}")
            self._refine(st)
            return
        sample = self._train_captions()["long"][:4]
        self.llm_info = {**measure_llm(self.s.llm, sample), "key": key}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(self.llm_info, indent=2) + "\n")
        self._refine(st)
        st.end(note=f"fp32 {self.llm_info['float32']:.0f} tok/s, bf16 {self.llm_info['bfloat16']:.0f} tok/s -> "
                    f"{self.llm_info['dtype']}")

    def _refine(self, st: Stages) -> None:
        rate = self.llm_info.get("tokens_per_s")
        if not rate:
            return
        tokens = _prompt_tokens(self.s.llm, self._train_captions())
        if "embed" not in st.times:
            st.estimates["embed"] = tokens / rate
        texts = self._eval_texts()
        st.estimates["eval"] = 15 + _prompt_tokens(self.s.llm, {"raw": [t for v in texts.values() for t in v]}) / rate

    # 3 ----------------------------------------------------------------------------------------
    def _embed(self, st: Stages) -> None:
        from flame.cli import main as flame_main

        settings = self.s.subset(*EMBED_KEYS)
        st.begin("embed", f"{self.s.combos} distinct short + long captions -> facet store (K = 3 + 7)")
        if st.done_with("embed", settings) and (self.store / "manifest.json").is_file():
            st.end(skipped=True)
            return
        shutil.rmtree(self.store, ignore_errors=True)
        argv = ["embed", "--data", str(self.data / "train"), "--prompts", "short=txt", "long=long.txt",
                "--llm", self.s.llm, "--layer", self.s.layer, "--out", str(self.store), "--device", "cpu",
                "--llm-dtype", self.llm_info.get("dtype", "float32")]
        code = flame_main(argv)
        if code:
            raise FlameError(f"flame embed failed (exit {code}); rerun flame demo to continue")
        st.mark("embed", settings)
        st.end()

    # 4 ----------------------------------------------------------------------------------------
    # Both trainings load data in the training process (workers=0): on a 2-core CPU a loader process
    # competes with the two compute threads, and measured 361 img/s against 429 in-process. The stream
    # seeds every sample's crop and facets itself, so the batches (and the numbers) are the same.
    def _train_config(self):
        from flame.train import TrainConfig

        s = self.s
        return TrainConfig(
            data=[str(self.data / "train")], embeddings=str(self.store), out=str(self.flame_run), tower=s.tower,
            image_size=s.image_size, proj_hidden=s.proj_hidden, pool_first=s.pool_first,
            init_logit_scale=s.init_logit_scale, batch_size=s.batch_size, steps=s.steps, lr=s.lr, warmup=s.warmup,
            weight_decay=s.weight_decay, workers=0, device="cpu", seed=s.seed, log_every=10,
            save_every=max(50, s.steps // 4), keep=1, tensorboard=False, progress=self.progress,
        )

    def _train(self, st: Stages) -> None:
        from flame.train import train

        settings = self.s.subset(*TRAIN_KEYS)
        st.begin("train", f"FLAME: {self.s.tower} {self.s.steps} steps x batch {self.s.batch_size} on the CPU")
        final = self.flame_run / f"checkpoint-{self.s.steps}"
        if st.done_with("train", settings) and (final / "model.safetensors").is_file():
            st.end(skipped=True)
            self._scale_clip(st)
            return
        cfg = self._train_config()
        if st.done_with("train.started", settings) and any(self.flame_run.glob("checkpoint-*")):
            cfg.resume = "latest"  # an interrupted demo continues its run
        else:
            shutil.rmtree(self.flame_run, ignore_errors=True)
        st.mark("train.started", settings)
        code = train(cfg)
        if code:
            raise FlameError(f"flame train failed (exit {code})")
        st.mark("train", settings)
        st.end()
        self._scale_clip(st)

    def _scale_clip(self, st: Stages) -> None:
        if "train" in st.times and "train" not in st.skipped and "clip" not in st.times:
            st.estimates["clip"] = st.times["train"] * 1.15

    # 5 ----------------------------------------------------------------------------------------
    def _clip_config(self):
        from flame.baseline import BaselineConfig, ClipTextConfig
        from flame.model import FlameModel

        s = self.s
        tower = FlameModel.load(self._flame_checkpoint()).tower_config.to_dict()
        return BaselineConfig(
            shards=[str(p) for p in sorted((self.data / "train").glob("*.tar"))], store=str(self.store),
            out=str(self.clip_run), tower=tower, steps=s.steps, batch_size=s.batch_size, lr=s.lr, warmup=s.warmup,
            weight_decay=s.weight_decay, seed=s.seed, workers=0, text=ClipTextConfig(**s.clip_text),
            data=s.scenes().to_dict(),
        )

    def _flame_checkpoint(self) -> Path:
        return self.flame_run / f"checkpoint-{self.s.steps}"

    def _clip(self, st: Stages) -> None:
        from flame.baseline import is_complete, train_baseline

        cfg = self._clip_config()
        st.begin("clip", f"CLIP baseline: same tower, stream and steps; open_clip text transformer "
                         f"({cfg.text.layers} layers, width {cfg.text.width}) + ClipLoss on the short captions")
        if is_complete(cfg.out, cfg):
            st.end(skipped=True)
            return
        train_baseline(cfg, progress=self.progress)
        st.end()

    # 6 ----------------------------------------------------------------------------------------
    def _eval_texts(self) -> dict[str, list[str]]:
        """Split -> the texts its evaluation encodes (captions, or class prompts)."""
        from flame.evaluate import load_dataset
        from flame.evaluate.tasks import texts_needed

        out = {}
        for split in SPLITS:
            out[split] = texts_needed(load_dataset(self.data / "eval" / split), "zeroshot_retrieval")
        out["zeroshot"] = texts_needed(load_dataset(self.data / "eval" / "zeroshot"), "zeroshot_classification")
        return out

    def _text_cache(self) -> Path:
        return self.out / "cache" / "text"

    def _eval_texts_cached(self) -> bool:
        ckpt = self._flame_checkpoint()
        if not (ckpt / "config.json").is_file() or not (self.data / "settings.json").is_file():
            return False
        from flame.textenc import TextEncoder

        enc = TextEncoder(json.loads((ckpt / "config.json").read_text())["text"], cache_dir=self._text_cache())
        texts = [t for v in self._eval_texts().values() for t in v]
        return not enc.missing(texts, self.s.eval_prompts)

    def flame_model(self):
        from flame.model import FlameModel

        return FlameModel.from_pretrained(self._flame_checkpoint(), cache_dir=self._text_cache())

    def clip_model(self):
        from flame.baseline import load_baseline

        return load_baseline(self.clip_run)

    def _eval(self, st: Stages) -> dict:
        from flame.evaluate import evaluate, load_dataset

        st.begin("eval", f"{len(SPLITS)} retrieval splits + zero-shot, FLAME and CLIP (flame.evaluate)")
        flame = self.flame_model()
        texts = self._eval_texts()
        todo = flame.text_encoder.missing([t for v in texts.values() for t in v], self.s.eval_prompts)
        if todo:  # one LLM pass with one progress bar for every split's texts; evaluate() then reads the cache
            print(f"      encoding {len(todo)} new evaluation texts with {self.s.llm} ({self.s.eval_prompts} prompts)",
                  flush=True)
            flame.encode_text(todo, prompts=self.s.eval_prompts, progress=self.progress)
            flame.text_encoder.unload()
        clip_image, clip_text = self.clip_model()
        models = {"flame": (flame, None), "clip": (clip_image, clip_text)}
        metrics: dict = {m: {} for m in MODELS}
        img_cache = self.out / "cache" / "images"
        for split in (*SPLITS, "zeroshot"):
            task = "zeroshot-classification" if split == "zeroshot" else "retrieval"
            ds = load_dataset(self.data / "eval" / split, task=task)
            for name, (model, text) in models.items():
                r = evaluate(model, ds, task=task, prompts=self.s.eval_prompts, workers=0, cache_dir=img_cache,
                             progress=False, text=text)
                metrics[name][split] = _our_metrics(r, split, len(ds.classnames or []) if split == "zeroshot" else 0)
        for name in MODELS:
            langs = [metrics[name][s] for s in SPLITS if s.startswith("multilingual-")]
            metrics[name]["multilingual"] = {k: sum(m[k] for m in langs) / len(langs) for k in langs[0]}
        st.end()
        return metrics


def _our_metrics(result: dict, split: str, classes: int) -> dict:
    m = result["metrics"]
    if split == "zeroshot":
        return {"top1": m["acc1"], "top5": m.get("acc5"), "chance": 1.0 / classes}
    n = result["images"] - result.get("skipped_images", 0)
    return {
        "i2t_r1": m["text_retrieval_recall@1"], "t2i_r1": m["image_retrieval_recall@1"],
        "i2t_r5": m["text_retrieval_recall@5"], "t2i_r5": m["image_retrieval_recall@5"],
        "chance_r1": 1.0 / n, "chance_r5": min(1.0, 5.0 / n),
    }


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
