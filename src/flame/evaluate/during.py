"""Evaluation while training, without the LLM in memory during any step.

`TrainEvaluator` is the one hook `flame train --eval SUITE --eval-every N` builds (on rank 0).
Before the first step it computes every text vector the suite needs with a `TextEncoder` built
from the store manifest's text side (loading the LLM only for texts not cached yet) and frees
the LLM. Every N steps (and at the last) it evaluates the model being trained, in eval mode and
back, reading text vectors from the cache only (`CachedText` refuses to load an LLM), and logs
every metric as `eval/<name>/<metric>`.

A failed evaluation (its set deleted or unreadable, a DataLoader worker killed for memory) never
ends the run: the training loop has written that step's checkpoint first, the failure is one
line (`eval step N failed, training continues: ...`) and an `eval/failed` record, and training
goes on. The other ranks wait for rank 0's evaluation in `distributed.wait_for_main`, whose wait
has no 30-minute collective timeout (an evaluation may take hours).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from flame.errors import FlameError, first_line

log = logging.getLogger("flame.evaluate")


def prepare_texts(entries: Sequence, encoder, text: dict, progress: bool = True, datasets: list | None = None) -> dict:
    """Encode (and so cache) every text the suite's entries need. Returns
    {label: (texts, newly encoded, prompt set)}."""
    from flame.evaluate.tasks import canonical_task, default_prompts, default_task, texts_needed

    out = {}
    for i, e in enumerate(entries):
        ds = datasets[i] if datasets is not None else e.load()
        task = canonical_task(e.task) if e.task else default_task(ds)
        prompts = e.prompts or default_prompts(task, ds, text)
        texts = texts_needed(ds, task)
        new = len(encoder.missing(texts, prompts)) if texts else 0
        if texts:
            encoder.encode(texts, prompts=prompts, progress=progress)
        out[e.label(ds)] = (len(texts), new, prompts)
    return out


def eval_due(step: int, every: int, steps: int) -> bool:
    """Whether `flame train --eval` evaluates after `step` (every `every` steps and the last):
    known on every rank, so the others can wait for rank 0's evaluation."""
    return step % every == 0 or step == steps


class CachedText:
    """encode() from the text cache only: a text that is not cached is an error, never an LLM load."""

    def __init__(self, encoder):
        self.encoder = encoder

    def encode(self, texts, prompts="raw", progress: bool = False):
        missing = self.encoder.missing(texts, prompts)
        if missing:
            raise FlameError(f"{len(missing)} text(s) are not in the text cache (e.g. {missing[0]!r}); "
                             "the LLM is not loaded during training")
        return self.encoder.encode(texts, prompts=prompts)


class TrainEvaluator:
    def __init__(self, suite: str, every: int, text: dict, steps: int, device: str | None = None,
                 batch_size: int = 64, workers: int = 2, cache_dir=None, progress: bool = True):
        from flame.evaluate.tasks import Suite
        from flame.textenc import TextEncoder

        if every < 1:
            raise FlameError("--eval-every must be >= 1")
        self.every, self.steps = every, steps
        self.batch_size, self.workers = batch_size, workers
        self.entries = Suite.from_file(suite).entries
        self.datasets = [e.load() for e in self.entries]
        self.encoder = TextEncoder(text, cache_dir=cache_dir, device=device)
        try:
            counts = prepare_texts(self.entries, self.encoder, text, progress=progress, datasets=self.datasets)
        finally:
            self.encoder.unload()  # the LLM never stays for training
        new = sum(c[1] for c in counts.values())
        log.info("eval suite %s: %d dataset(s), %d text vectors (%d newly encoded; LLM %s)", suite, len(self.entries),
                 sum(c[0] for c in counts.values()), new, "loaded and freed" if new else "not loaded")
        self.text = CachedText(self.encoder)

    @classmethod
    def on_rank0(cls, suite: str, every: int, text: dict, steps: int, **kwargs) -> TrainEvaluator | None:
        """Built on rank 0 only (None elsewhere); a FlameError there is raised on every rank as an
        agreed error, so all processes stop together before training (as train.plan's errors do)."""
        from flame import distributed as dist

        evaluator, error = None, None
        if dist.is_main():
            try:
                evaluator = cls(suite, every, text, steps, **kwargs)
            except FlameError as e:
                error = str(e)
        dist.check_errors(error)  # agreed: rank 0 prints it once, the others leave quietly
        return evaluator

    def due(self, step: int) -> bool:
        return eval_due(step, self.every, self.steps)

    def evaluate(self, model) -> dict[str, float]:
        from flame.evaluate.tasks import evaluate

        was_training = model.training
        model.eval()
        record: dict[str, float] = {}
        try:
            for e, ds in zip(self.entries, self.datasets):
                r = evaluate(model, ds, e.task, e.prompts, batch_size=self.batch_size, workers=self.workers,
                             cache_dir=False, progress=False, text=self.text)
                for k, v in r["metrics"].items():
                    if isinstance(v, int | float):
                        record[f"eval/{e.label(ds)}/{k}"] = v
        finally:
            model.train(was_training)
        return record

    def after_step(self, step: int, model, write: Callable[[dict], None],
                   say: Callable[[str], None] = log.info) -> None:
        """Called by the training loop after every optimizer step (rank 0 only); `say` is how
        the training loop shows a line (the log by default)."""
        if not self.due(step):
            return
        t0 = time.perf_counter()
        try:
            record = self.evaluate(model)
        except Exception as e:  # an eval set gone or unreadable, a worker killed for memory, ...
            # evaluation is a measurement, not the run: one line, a record of it, and training goes on
            line = " ".join(first_line(e).split()) or type(e).__name__
            say(f"eval step {step} failed, training continues: {line}")
            write({"step": step, "eval/failed": 1, "eval/seconds": time.perf_counter() - t0})
            return
        write({"step": step, **record, "eval/seconds": time.perf_counter() - t0})
        say(f"eval step {step}: " + "  ".join(f"{k[5:]} {v:.4f}" for k, v in record.items()))
