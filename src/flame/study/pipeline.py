"""`flame study`'s stages in order (`Study.run`): data sets, the LLM's dtype, the stores, one training
per arm, one scoring per arm, the report. Each stage is skipped when its output exists with the same
settings (the demo's stage keys), so a rerun after a change redoes only what the change reaches."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

from flame.demo.facts import DemoPaths
from flame.demo.pipeline import MACHINE_ONLY, RUN_ONLY, clip_config, embed_config, flame_train_config, stage_key
from flame.demo.stages import Stages, clock
from flame.errors import FlameError
from flame.fileio import write_atomic
from flame.runfolder import checkpoint_name
from flame.study.arms import Arm, Store, plan
from flame.study.settings import StudySettings

OWN_MARK = ".flame-study"


class Study:
    def __init__(self, out: Path, settings: StudySettings, parts: tuple[str, ...], progress: bool = True):
        self.out, self.s, self.parts, self.progress = Path(out), settings, parts, progress
        self.arms, self.splits, self.members = plan(settings, parts)
        self.stores = {a.store.name: a.store for a in self.arms}
        self.sizes = sorted({a.size for a in self.arms} | {settings.largest})
        self.llm_info: dict = {}
        self.keys: dict[str, dict] = {}  # stage name -> its key (a stage's key holds the keys of its inputs)
        self.layout = DemoPaths(self.out)  # the demo's folders, caches and stage records, at the same places
        self.eval_root = self.data(settings.largest) / "eval"

    # where things are ---------------------------------------------------------------------------
    def data(self, size: int) -> Path:
        return self.layout.data / f"size-{size}"

    def store_path(self, store: Store) -> Path:
        return self.layout.store / store.name

    def run_path(self, arm: Arm) -> Path:
        return self.layout.runs / arm.name

    def checkpoint(self, arm: Arm) -> Path:
        return self.run_path(arm) / checkpoint_name(self.s.base.steps)

    # the run ------------------------------------------------------------------------------------
    def run(self) -> dict:
        st = Stages(self.layout.stages, self._estimates())
        print(f"flame study -> {self.out}: parts {', '.join(self.parts)}; {len(self.arms)} arms of "
              f"{self.s.base.steps} steps, {len(self.stores)} stores", flush=True)
        for size in self.sizes:
            self._data(st, size)
        self._llm(st)
        for store in self.stores.values():
            self._embed(st, store)
        for arm in self.arms:
            self._train(st, arm)
        results = {}
        for arm in self.arms:
            if self.splits[arm.name]:
                results[arm.name] = self._score(st, arm)
        from flame.study.report import write_report

        st.begin("report", "study.json, study.md, plots")
        summary = write_report(self.out, self.s, self.parts, self.arms, self.members, results, st.timings())
        st.end()
        print(f"flame study: total {clock(st.elapsed())}; report in {self.out / 'study.md'}", flush=True)
        return summary

    def _estimates(self) -> dict[str, float]:
        b = self.s.base
        est = {f"data-{n}": 0.008 * (n + 4 * b.eval_size + b.zeroshot) for n in self.sizes}
        est["llm"] = 30.0
        est.update({f"embed-{s.name}": s.size / self.s.images_per_combo * len(s.prompts) * 0.12
                    for s in self.stores.values()})
        est.update({f"train-{a.name}": b.steps * b.batch_size * (0.0025 if a.model == "flame" else 0.0035)
                    for a in self.arms})
        est.update({f"score-{a.name}": 5.0 + 2.0 * len(self.splits[a.name]) for a in self.arms if self.splits[a.name]})
        est["report"] = 5.0
        return est

    # stages -------------------------------------------------------------------------------------
    def _data(self, st: Stages, size: int) -> None:
        from flame.data import scenes

        config = self.s.scenes(size)
        self.keys[f"data-{size}"] = config.to_dict()
        st.begin(f"data-{size}", f"{size} training images of {config.combos} combinations + evaluation splits")
        wrote = scenes.write_dataset(self.data(size), config)
        st.end(skipped=not wrote)

    def _llm(self, st: Stages) -> None:
        import platform
        import sys

        from flame.demo.measure import measure_llm

        st.begin("llm", f"time {self.s.base.llm} in fp32 against bf16 on this CPU")
        key = {"llm": self.s.base.llm, "cpu": platform.processor() or platform.machine(),
               "python": sys.version.split()[0]}
        path = st.marker("llm")
        try:
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                self.llm_info = saved
                st.end(skipped=True, note=f"dtype {saved['dtype']}")
                return
        except (OSError, ValueError, KeyError):
            pass
        from flame.data.scenes import late_caption, plan

        sample = [late_caption(c) for c in plan(self.s.scenes(self.s.largest)).combos[:4]]
        self.llm_info = {**measure_llm(self.s.base.llm, sample), "key": key}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(self.llm_info, indent=2) + "\n")
        st.end(note=f"fp32 {self.llm_info['float32']:.0f} tok/s, bf16 {self.llm_info['bfloat16']:.0f} tok/s -> "
                    f"{self.llm_info['dtype']}")

    def _embed(self, st: Stages, store: Store) -> None:
        from flame import embed

        name, out = f"embed-{store.name}", self.store_path(store)
        cfg = embed_config(self.s.base, self.data(store.size) / "train", list(store.prompts), out, store.positions)
        key = self.keys[name] = stage_key(cfg, self.out, MACHINE_ONLY, data=self.keys[f"data-{store.size}"])
        st.begin(name, f"{' + '.join(store.prompts)} ({store.positions}) on the {store.size}-image set")
        if st.done_with(name, key) and (out / "manifest.json").is_file():
            st.end(skipped=True)
            return
        shutil.rmtree(out, ignore_errors=True)
        code = embed.main(replace(cfg, llm_dtype=self.llm_info.get("dtype", "float32")))
        if code:
            raise FlameError(f"flame embed failed (exit {code}); rerun flame study to continue")
        st.mark(name, key)
        st.end()

    def _train(self, st: Stages, arm: Arm) -> None:
        name = f"train-{arm.name}"
        st.begin(name, f"{arm.label}: {self.s.base.steps} steps x batch {self.s.base.batch_size}")
        store_key = self.keys[f"embed-{arm.store.name}"]
        if arm.model == "clip":
            self._train_clip(st, arm, store_key)
            return
        cfg = flame_train_config(self.s.base, self.data(arm.size) / "train", self.store_path(arm.store),
                                 self.run_path(arm), self.progress, facets=arm.facets)
        key = self.keys[name] = stage_key(cfg, self.out, RUN_ONLY, embed=store_key)
        if st.done_with(name, key) and (self.checkpoint(arm) / "model.safetensors").is_file():
            st.end(skipped=True)
            return
        from flame.train import train

        if st.done_with(f"{name}.started", key) and any(self.run_path(arm).glob("checkpoint-*")):
            cfg = replace(cfg, resume="latest")
        else:
            shutil.rmtree(self.run_path(arm), ignore_errors=True)
        st.mark(f"{name}.started", key)
        if train(cfg):
            raise FlameError(f"flame train failed for {arm.name}")
        st.mark(name, key)
        st.end()

    def _train_clip(self, st: Stages, arm: Arm, store_key: dict) -> None:
        from flame.baseline import is_complete, train_baseline
        from flame.model import FlameModel

        tower = FlameModel.load(self.checkpoint(next(a for a in self.arms if a.name == arm.twin))).tower_config
        cfg = clip_config(self.s.base, self.data(arm.size) / "train", self.store_path(arm.store), self.run_path(arm),
                          tower.to_dict(), {"scenes": self.keys[f"data-{arm.size}"], "store": store_key},
                          caption_ext=arm.caption, context_length=arm.context)
        self.keys[f"train-{arm.name}"] = cfg.to_dict()
        if is_complete(cfg.out, cfg):
            st.end(skipped=True)
            return
        train_baseline(cfg, progress=self.progress)
        st.end()

    def _score(self, st: Stages, arm: Arm) -> dict:
        from flame.study import scoring

        name, splits = f"score-{arm.name}", self.splits[arm.name]
        key = {"train": self.keys[f"train-{arm.name}"], "splits": list(splits),
               "eval": self.keys[f"data-{self.s.largest}"], "prompts": scoring.PROMPTS, "version": 1}
        path = self.out / "results" / f"{arm.name}.json"
        st.begin(name, f"{arm.label} on {len(splits)} splits")
        try:
            saved = json.loads(path.read_text())
            if saved["key"] == json.loads(json.dumps(key)):
                st.end(skipped=True)
                return saved["metrics"]
        except (OSError, ValueError, KeyError):
            pass
        model, text = self._load(arm, splits)
        metrics = scoring.score(model, text, self.eval_root, splits, self.layout.image_cache)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({"key": key, "metrics": metrics}, indent=2) + "\n")
        st.end()
        return metrics

    def _load(self, arm: Arm, splits: tuple[str, ...]):
        """-> (image side, CLIP text side or None); a FLAME arm's evaluation texts are encoded first,
        one LLM pass per prompt set for every text not cached yet."""
        if arm.model == "clip":
            from flame.baseline import load_baseline

            return load_baseline(self.run_path(arm))
        from flame.model import FlameModel
        from flame.study.scoring import texts_needed

        model = FlameModel.from_pretrained(self.checkpoint(arm), cache_dir=self.layout.text_cache)
        for prompts, texts in texts_needed(self.eval_root, splits).items():
            todo = model.text_encoder.missing(list(dict.fromkeys(texts)), prompts)
            if todo:
                print(f"      encoding {len(todo)} evaluation texts ({prompts} prompts)", flush=True)
                model.encode_text(todo, prompts=prompts, progress=self.progress)
        model.text_encoder.unload()
        return model, None
