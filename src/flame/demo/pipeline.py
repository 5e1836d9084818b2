"""The demo's stages 1-5 and 7 in order (`Demo.run`); each is skipped when its output exists
with the same settings. Stage 6 is `flame.demo.evaluation`, the report `flame.demo.report`,
which receives a `DemoResult` and never sees this module."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
from dataclasses import asdict, is_dataclass, replace
from pathlib import Path

from flame.demo import evaluation
from flame.demo.facts import SPLITS, DemoPaths, DemoResult, machine, now, summary_table
from flame.demo.measure import measure_llm, prompt_tokens
from flame.demo.settings import Config, DemoSettings
from flame.demo.stages import Stages, clock
from flame.errors import FlameError
from flame.fileio import write_atomic

# TrainConfig fields that change how a run looks or where it starts, never its numbers: left out of
# the stage key (anything else, including a field added later, is in it: a forgotten one re-runs, never
# reuses a stale result)
RUN_ONLY = frozenset({"progress", "resume"})
# embed settings left out of the key: the LLM dtype is a speed choice, measured on this machine by
# stage 2; a machine that chooses another dtype reuses the store instead of embedding again
MACHINE_ONLY = frozenset({"llm_dtype"})


def main(cfg: Config) -> int:
    """`flame demo`: the whole pipeline into `cfg.out` (cached stages are skipped)."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise FlameError(f"--out {out} exists and is not a folder")
    claim_out(out)
    return Demo(out, cfg.settings(), progress=cfg.progress).run()


OWN_MARK = ".flame-demo"  # written into --out by the demo: the folders it replaces are its own


def claim_out(out: Path) -> None:
    """Make `out` the demo's folder, or refuse before any work. The demo replaces OUT/data,
    store, runs and cache/images when its settings change; in a folder it did not make (no
    OUT/.flame-demo, and no OUT/stages/llm.json of a demo made before the mark existed) any of them
    existing is the user's, and nothing is removed."""
    paths = DemoPaths(out)
    mark = out / OWN_MARK
    if not mark.is_file() and not (paths.stages / "llm.json").is_file():
        theirs = [p for p in (paths.data, paths.store, paths.runs, paths.image_cache) if p.exists() or p.is_symlink()]
        if theirs:
            raise FlameError(
                f"--out {out} already holds {theirs[0].relative_to(out).as_posix()}/, which flame demo did not make "
                "(the demo replaces its own data/, store/, runs/ and cache/images/); choose a new or empty --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    if not mark.is_file():
        write_atomic(mark, "made by flame demo: its data/, store/, runs/, cache/ are replaced when settings change\n")


def stage_key(config: object, root: Path, leave_out: frozenset[str] = frozenset(), **inputs: dict) -> dict:
    """A stage's cache key: its configuration object as plain data (paths under `root` relative
    to it, so a moved demo folder stays cached) without `leave_out`, and the keys of the stages
    whose outputs it reads (`inputs`): a change upstream re-runs every stage below it."""
    fields = asdict(config) if is_dataclass(config) else dict(config)
    plain = json.loads(json.dumps({k: v for k, v in fields.items() if k not in leave_out}, default=str))
    prefix = str(root) + os.sep

    def rel(value):
        if isinstance(value, dict):
            return {k: rel(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rel(v) for v in value]
        return "OUT/" + value[len(prefix):] if isinstance(value, str) and value.startswith(prefix) else value

    return {"config": rel(plain), "inputs": inputs}


class Demo:
    """The stages in order. Each stage's configuration object is built once, here, from the
    settings; its cache key is derived from that object."""

    def __init__(self, out: Path, settings: DemoSettings, progress: bool = True):
        self.paths = DemoPaths(Path(out))
        self.s, self.progress = settings, progress
        self.llm_info: dict = {}
        self.scenes_config = settings.scenes()
        self.embed_settings = self._embed_settings()
        self.train_config = self._train_config()
        root = self.paths.out
        data_key = self.scenes_config.to_dict()
        self.embed_key = stage_key(self.embed_settings, root, MACHINE_ONLY, data=data_key)
        self.train_key = stage_key(self.train_config, root, RUN_ONLY, embed=self.embed_key)

    # rough first guesses (seconds on an idle 2-core CPU), refined by measurements on the way
    def _estimates(self) -> dict[str, float]:
        s = self.s
        imgs = s.train_images + 2 * s.eval_size + s.zeroshot
        return {"data": imgs * 0.006, "llm": 15.0, "embed": s.combos * 255 / 300, "train": s.steps * s.batch_size / 400,
                "clip": s.steps * s.batch_size / 300, "eval": 15 + s.eval_size * 320 / 300, "report": 5.0}

    def run(self) -> int:
        import torch

        from flame.demo.report import write_report

        st = Stages(self.paths.stages, self._estimates())
        print(f"flame demo -> {self.paths.out} ({self.s.train_images} training images, {self.s.steps} steps; "
              f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()})", flush=True)
        self._data(st)
        self._llm(st)
        self._embed(st)
        self._train(st)
        self._clip(st)
        st.begin("eval", f"{len(SPLITS)} retrieval splits + zero-shot, FLAME and CLIP (flame.evaluate)")
        metrics = evaluation.evaluate_models(self.paths, self.s, self.progress)
        st.end()
        st.begin("report", "metrics.json, report.md, plots")
        result = DemoResult(settings=self.s, paths=self.paths, metrics=metrics, timings=st.timings(),
                            skipped=list(st.skipped), llm=dict(self.llm_info), machine=machine(), date=now())
        write_report(result)
        st.end()
        print(f"flame demo: total {clock(st.elapsed())}; report in {self.paths.out / 'report.md'}")
        print(summary_table(metrics))
        return 0

    # 1 ----------------------------------------------------------------------------------------
    def _data(self, st: Stages) -> None:
        from flame.data import scenes

        config = self.scenes_config
        st.begin("data", f"{config.train} training images of {config.combos} captioned combinations + eval splits")
        if scenes.settings_match(self.paths.data, config):
            st.end(skipped=True)
            return
        bar = None
        if self.progress:
            from flame.progress import progress

            bar = progress(total=config.train + 2 * config.eval_size + config.zeroshot, unit="img", desc="scenes")
        scenes.write_dataset(self.paths.data, config, progress=bar.update if bar else None)
        if bar:
            bar.close()
        for stale in (self.paths.store, self.paths.runs, self.paths.image_cache):  # made from other data
            shutil.rmtree(stale, ignore_errors=True)
        st.end()

    def _train_captions(self) -> dict[str, list[str]]:
        from flame.data import scenes

        p = scenes.plan(self.scenes_config)
        return {"short": [scenes.short_caption(c) for c in p.combos],
                "long": [scenes.long_caption(c) for c in p.combos]}

    # 2 ----------------------------------------------------------------------------------------
    def _llm(self, st: Stages) -> None:
        st.begin("llm", f"load {self.s.llm}, time fp32 against bf16 on this CPU")
        need = not (st.done_with("embed", self.embed_key) and evaluation.eval_texts_cached(self.paths, self.s))
        path = st.marker("llm")
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
        tokens = prompt_tokens(self.s.llm, self._train_captions())
        if "embed" not in st.times:
            st.estimates["embed"] = tokens / rate
        texts = evaluation.eval_texts(self.paths)
        st.estimates["eval"] = 15 + prompt_tokens(self.s.llm, {"raw": [t for v in texts.values() for t in v]}) / rate

    # 3 ----------------------------------------------------------------------------------------
    def _embed_settings(self):
        """`flame embed`'s configuration: the short set on the short caption, the long set on the long
        one. The LLM dtype is filled in by stage 2's measurement."""
        return embed_config(self.s, self.paths.data / "train", ["short=txt", "long=long.txt"], self.paths.store)

    def _embed(self, st: Stages) -> None:
        store = self.paths.store
        st.begin("embed", f"{self.s.combos} distinct short + long captions -> facet store (K = 3 + 7)")
        if st.done_with("embed", self.embed_key) and (store / "manifest.json").is_file():
            st.end(skipped=True)
            return
        shutil.rmtree(store, ignore_errors=True)
        from flame import embed

        code = embed.main(replace(self.embed_settings, llm_dtype=self.llm_info.get("dtype", "float32")))
        if code:
            raise FlameError(f"flame embed failed (exit {code}); rerun flame demo to continue")
        st.mark("embed", self.embed_key)
        st.end()

    # 4 ----------------------------------------------------------------------------------------
    def _train_config(self):
        return flame_train_config(self.s, self.paths.data / "train", self.paths.store, self.paths.flame_run,
                                  self.progress)

    def _train(self, st: Stages) -> None:
        from flame.train import train

        key, run = self.train_key, self.paths.flame_run
        st.begin("train", f"FLAME: {self.s.tower} {self.s.steps} steps x batch {self.s.batch_size} on the CPU")
        final = self.paths.flame_checkpoint(self.s.steps)
        if st.done_with("train", key) and (final / "model.safetensors").is_file():
            st.end(skipped=True)
            self._scale_clip(st)
            return
        cfg = self.train_config
        if st.done_with("train.started", key) and any(run.glob("checkpoint-*")):
            cfg = replace(cfg, resume="latest")  # an interrupted demo continues its run
        else:
            shutil.rmtree(run, ignore_errors=True)
        st.mark("train.started", key)
        code = train(cfg)
        if code:
            raise FlameError(f"flame train failed (exit {code})")
        st.mark("train", key)
        st.end()
        self._scale_clip(st)

    def _scale_clip(self, st: Stages) -> None:
        if "train" in st.times and "train" not in st.skipped and "clip" not in st.times:
            st.estimates["clip"] = st.times["train"] * 1.15

    # 5 ----------------------------------------------------------------------------------------
    def _clip_config(self):
        """The CLIP baseline's configuration: the trained FLAME tower, the same stream and schedule."""
        from flame.model import FlameModel

        tower = FlameModel.load(self.paths.flame_checkpoint(self.s.steps)).tower_config.to_dict()
        return clip_config(self.s, self.paths.data / "train", self.paths.store, self.paths.clip_run, tower,
                           self.scenes_config.to_dict())

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


# The stages' configurations, from the settings and where things are (also built by `flame study`)
def embed_config(s: DemoSettings, data: Path, prompts: list[str], out: Path, positions: str = "restart"):
    """`flame embed`'s configuration (`flame.embed.Config`, checked as the command line checks it), on
    the CPU in fp32 (the caller swaps in the dtype its measurement chose)."""
    from flame import embed
    from flame.config import validate

    return validate(embed.Config(data=[str(data)], prompts=list(prompts), llm=s.llm, layer=s.layer, out=str(out),
                                 device="cpu", llm_dtype="float32", positions=positions))


# Both trainings load data in the training process (workers=0): on a 2-core CPU a loader process
# competes with the two compute threads, and measured 361 img/s against 429 in-process. The stream
# seeds every sample's crop and facets itself, so the batches (and the numbers) are the same.
def flame_train_config(s: DemoSettings, data: Path, store: Path, out: Path, progress: bool, facets: str = "all"):
    """A FLAME run's configuration (`flame.train.TrainConfig`)."""
    from flame.train import TrainConfig

    return TrainConfig(
        data=[str(data)], embeddings=str(store), out=str(out), tower=s.tower, image_size=s.image_size,
        proj_hidden=s.proj_hidden, pool_first=s.pool_first, init_logit_scale=s.init_logit_scale, facets=facets,
        batch_size=s.batch_size, steps=s.steps, lr=s.lr, warmup=s.warmup, weight_decay=s.weight_decay, workers=0,
        device="cpu", seed=s.seed, log_every=10, save_every=max(50, s.steps // 4), keep=1, tensorboard=False,
        progress=progress,
    )


def clip_config(s: DemoSettings, data: Path, store: Path, out: Path, tower: dict, data_key: dict,
                caption_ext: str = "txt", context_length: int | None = None):
    """A CLIP baseline's configuration: `tower` (a trained FLAME run's TowerConfig.to_dict()), the same
    stream and schedule; `flame.baseline.is_complete` compares all of it with the finished run's."""
    from flame.baseline import BaselineConfig, ClipTextConfig

    text = {**s.clip_text, **({"context_length": context_length} if context_length else {})}
    return BaselineConfig(
        shards=[str(p) for p in sorted(Path(data).glob("*.tar"))], store=str(store), out=str(out), tower=tower,
        steps=s.steps, batch_size=s.batch_size, lr=s.lr, warmup=s.warmup, weight_decay=s.weight_decay, seed=s.seed,
        workers=0, text=ClipTextConfig(**text), caption_ext=caption_ext, data=data_key,
    )
