"""The training loop. `Trainer.fit` reads top to bottom: resume, then
`while step < steps: train_step, log, evaluate, checkpoint`. Everything it uses is built in
`__init__` from the checked `Plan`, and each concern is its own module: the run state
(`state`), the step's exact gradients over its micro-batches (`accumulate`), optimizer and
schedule (`optim`), non-finite guard (`guard`), log and progress (`logger`), checkpoints
(`checkpoint`, names from `flame.runfolder`).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path

import torch

from flame import distributed as dist
from flame.errors import FlameError
from flame.runfolder import checkpoint_name
from flame.train import accumulate
from flame.train.checkpoint import clean_temporaries, save_checkpoint, start_over, write_train_config
from flame.train.config import TrainConfig
from flame.train.guard import NonFiniteGuard, step_unless
from flame.train.logger import Console, Logger, Meter
from flame.train.optim import adamw, param_groups, schedule
from flame.train.plan import Plan, compile_ready, grad_checkpointing, use_bf16
from flame.train.state import TrainState, checkpoint_state, seed_everything

log = logging.getLogger("flame.train")


class Trainer:
    """The FLAME run. A variant (the demo's CLIP baseline) overrides `build`, `loss` and the
    reporting hooks and keeps the loop, the state, the guard and the logger."""

    desc = "train"  # the progress bar's label

    def __init__(self, cfg: TrainConfig, plan: Plan, device: torch.device):
        self.cfg, self.plan, self.device = cfg, plan, device
        self.main, self.run = dist.is_main(), Path(cfg.out)
        self.evaluator = _evaluator(cfg, plan, device)  # before the seed: it loads (and frees) the LLM
        if cfg.deterministic:
            deterministic()
        seed_everything(cfg.seed)
        self.build()
        self.state = TrainState()
        self.guard = NonFiniteGuard(cfg.max_nonfinite, device)
        self.global_batch = cfg.batch_size * cfg.accum * dist.world_size()
        self.last_saved: Path | None = plan.resume_from  # the newest checkpoint with finite weights
        self.norm: list[torch.Tensor] | None = None  # the images' mean and std on the device

    def build(self) -> None:
        """The model, its (DDP) forward, the parameters trained, optimizers, schedules and loss."""
        from flame.loss import make_loss

        cfg, plan = self.cfg, self.plan
        self.model = build_model(cfg, plan, self.device)
        self.load_resumed_weights()  # before DDP, whose first broadcast then gives every rank rank 0's weights
        self.ddp = dist.wrap_ddp(self.model, self.device)
        if cfg.compile:  # the forward only: checkpoints, evaluation and the state dict use the plain model
            compile_ready(self.device)
            self.ddp = torch.compile(self.ddp)
        self.trained: torch.nn.Module = self.model
        self.optimizers = [adamw(param_groups(self.model, cfg.weight_decay), cfg.lr, cfg.betas, cfg.eps)]
        self.schedulers = [schedule(self.optimizers[0], plan.warmup, plan.steps, cfg.lr, cfg.min_lr)]
        self.loss_fn = make_loss(cfg.loss)
        self.bf16 = use_bf16(cfg, self.device)

    def fit(self) -> int:
        self.resume()
        self.prepare_run_folder()
        loader = self.make_loader()
        self.describe()
        self.logger = Logger(self.run, self.main, self.plan.report_to, self.state.step, self.cfg.comparable())
        self.console = Console(self.main, self.cfg.progress, self.plan.steps * self.global_batch,
                               self.state.step * self.global_batch, desc=self.desc)
        self.meter = Meter(self.state.step, self.device)
        data = iter(loader)
        self.ddp.train()
        try:
            while self.state.step < self.plan.steps:
                self.train_step(data)
                self.log()
                self.checkpoint()  # first: a failing evaluation can never cost this step's checkpoint
                self.evaluate()
        finally:
            self.console.close()
            self.logger.close()
            del data
        dist.leave_together()
        self.finish()
        return 0

    # -- the four parts of a step ----------------------------------------------------------
    def train_step(self, data) -> None:
        """One optimizer step over `accum` micro-batches, that of the accum-times larger batch. A
        non-finite loss or gradient on any rank skips the update on every rank, decided on the
        device (`flame.train.guard`): no host sync in a step."""
        micro = next_batches(data, self.cfg.accum)
        for batch in micro:
            self.state.observe(batch["state"])
        step_loss = self.backward(micro)
        bad = self.guard.flag(step_loss, self.trained)
        self.state.step += 1
        for optimizer, scheduler in zip(self.optimizers, self.schedulers):
            step_unless(optimizer, bad)
            with warnings.catch_warnings():  # the schedule follows the data: it advances on a skipped step
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        self.meter.add(step_loss, bad)
        self.after_update()
        self.console.advance(self.global_batch)

    def backward(self, micro: list[dict]) -> torch.Tensor:
        """The step's gradients, exactly the full batch's (`flame.train.accumulate`); returns its
        loss (this rank's share: the mean over ranks is the full batch's)."""
        return accumulate.exact(self, micro)

    def loss(self, batch: dict) -> torch.Tensor:
        """The loss of one micro-batch against its own texts (through DDP, under bf16 autocast where chosen)."""
        with self.autocast():
            out = self.ddp(self.images(batch))
            return self.loss_fn(out["image"], self.texts(batch), out["logit_scale"], out["logit_bias"])

    def images(self, batch: dict) -> torch.Tensor:
        from flame.data.images import normalize_images

        if self.norm is None:  # the mean and std on the device once, not from Python lists per micro-batch
            self.norm = [torch.tensor(v, dtype=torch.float32, device=self.device) for v in (self.model.mean,
                                                                                           self.model.std)]
        return normalize_images(batch["images"].to(self.device, non_blocking=True), *self.norm)

    def texts(self, batch: dict) -> torch.Tensor:
        """The stored vectors in the store's dtype: the loss gathers them so and computes in fp32."""
        return batch["texts"].to(self.device, non_blocking=True)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def after_update(self) -> None:
        self.model.clamp_()

    def log(self) -> None:
        """Every `log_every` steps and the last step (a collective, and the step's only host sync):
        the record, then the non-finite guard's verdict on the steps since the last one."""
        step = self.state.step
        if not (step % self.cfg.log_every == 0 or step == self.plan.steps):
            return
        record = self.record(step)
        self.logger.write(record)
        self.report(record)
        if record["nonfinite"]:
            self.console.say(f"step {step}: {record['nonfinite']} step(s) since the last log line had a non-finite "
                             f"loss or gradient: their updates were skipped ({self.guard.total} in all)")
        self.guard.settle(step, self.last_saved)
        self.console.postfix(record["loss"])
        self.meter.reset(step)

    def record(self, step: int) -> dict:
        """The log.jsonl record of this step (the loss and counts summed over every rank)."""
        speed = self.meter.images_per_s(step, self.global_batch)
        missing, undecodable, samples = dist.all_reduce_sum_int(self.state.totals(), self.device)
        return {
            "step": step, "loss": self.meter.mean_loss(), "lr": self.schedulers[0].get_last_lr()[0],
            "logit_scale": self.model.logit_scale.exp().item(), "logit_bias": self.model.logit_bias.item(),
            "images_per_s": speed, "epoch": self.state.epoch, "samples": samples, "skipped_missing": missing,
            "skipped_undecodable": undecodable, "nonfinite": self.guard.logged(),
        }

    def report(self, r: dict) -> None:
        loss = "n/a" if r["loss"] is None else f"{r['loss']:.4f}"
        self.console.say(
            f"step {r['step']}/{self.plan.steps}  loss {loss}  lr {r['lr']:.2e}  t {r['logit_scale']:.2f}  "
            f"b {r['logit_bias']:.2f}  {r['images_per_s']:.1f} img/s  epoch {r['epoch']}  skipped "
            f"{r['skipped_missing']} no-embedding, {r['skipped_undecodable']} undecodable, "
            f"{self.guard.total} non-finite steps"
        )

    def evaluate(self) -> None:
        """Rank 0 evaluates when due (a failure is one line, never the end of the run); the other
        ranks wait for it without the collectives' timeout."""
        if self.evaluator is not None:
            self.evaluator.after_step(self.state.step, self.model, self.logger.write, self.console.say)
        step = self.state.step
        if self.cfg.eval and (step % self.cfg.eval_every == 0 or step == self.plan.steps):  # during.eval_due
            dist.wait_for_main()

    def checkpoint(self) -> None:
        """Every `save_every` steps and the last: all ranks gather the state, rank 0 writes it; a
        failed write (full disk) stops every rank."""
        step = self.state.step
        if not (step % self.cfg.save_every == 0 or step == self.plan.steps):
            return
        self.guard.settle(step, self.last_saved)  # a run of non-finite steps stops before it is saved
        self.guard.check_weights(self.model, step, self.last_saved)
        schedule_ = {"steps": self.cfg.steps, "epochs": self.cfg.epochs, "total": self.plan.steps}
        state = checkpoint_state(self.state, self.optimizers[0], self.schedulers[0], workers=self.cfg.workers,
                                 data=self.plan.data, schedule=schedule_)
        error = None
        if self.main:
            try:
                self.console.say(f"saved {save_checkpoint(self.run, step, self.model, state, self.cfg.keep)}")
            except FlameError as e:
                error = str(e)
        dist.check_errors(error)
        self.last_saved = self.run / checkpoint_name(step)

    def finish(self) -> None:
        if self.main:
            print(f"done: {self.plan.steps} steps; model in {self.run / checkpoint_name(self.plan.steps)}")

    # -- before the first step ----------------------------------------------------------------
    def load_resumed_weights(self) -> None:
        if self.plan.resume_state is not None:
            from safetensors.torch import load_file

            weights = self.plan.resume_from / "model.safetensors"
            self.model.load_state_dict(load_file(str(weights), device=str(self.device)))

    def resume(self) -> None:
        """Optimizer, schedule and run state from the planned checkpoint (if any; the weights are
        loaded in `build`)."""
        saved = self.plan.resume_state
        if saved is None:
            return
        self.optimizers[0].load_state_dict(saved["optimizer"])
        self.schedulers[0].load_state_dict(saved["scheduler"])
        self.state.resume(saved, self.cfg.workers)
        if self.main:
            log.info("resumed from %s at step %d", self.plan.resume_from, self.state.step)

    def prepare_run_folder(self) -> None:
        """Rank 0: drop temporaries of a killed job; with --force and no resume, only now (all
        checked and built) delete the old checkpoints; record the settings."""
        if not self.main:
            return
        clean_temporaries(self.run)
        if self.plan.resume_from is None and self.cfg.force:
            start_over(self.run)
        write_train_config(self.run, self.cfg.comparable(), dist.world_size(), self.plan.steps, self.plan.data)

    def make_loader(self):
        from flame.data.images import StreamConfig, make_loader

        cfg, workers = self.cfg, max(0, self.cfg.workers)
        stream = StreamConfig(
            shards=[str(s) for s in self.plan.shards], store=str(self.plan.store.path),
            image_size=self.model.image_size, batch_size=cfg.batch_size, m=self.plan.m, eligible=self.plan.eligible,
            seed=cfg.seed, crop_scale=tuple(cfg.crop_scale), rank=dist.rank(), world=dist.world_size(),
            positions={k: list(v) for k, v in self.state.positions.items()},
            rotate=self.state.batches % max(1, workers),
            sources=self.plan.mix, epoch_samples=cfg.train_num_samples or self.plan.samples,
        )
        return make_loader(stream, workers, pin_memory=self.device.type == "cuda")

    def describe(self) -> None:
        if not self.main:
            return
        cfg, p = self.cfg, self.plan
        n_params = sum(q.numel() for q in self.model.parameters())
        log.info(
            "flame train: %s (%.1fM params, D=%d, H=%d, %s), %d shards / %d samples, m=%d of %d facets, "
            "loss %s, global batch %d (%d ranks x %d x %d accum), %d steps (%d warm-up), device %s%s",
            cfg.tower, n_params / 1e6, p.store.dim, p.tower_config.hidden,
            "pool-first" if p.tower_config.pool_first else "per-token projector", len(p.shards), p.samples,
            p.m, len(p.eligible), cfg.loss, self.global_batch, dist.world_size(), cfg.batch_size, cfg.accum, p.steps,
            p.warmup, self.device, " bf16" if self.bf16 else "",
        )


def deterministic() -> None:
    """Deterministic algorithms. On CUDA, cuBLAS is only deterministic with a fixed workspace, and
    torch raises at the first matmul without it; it must be set before cuBLAS starts, so here,
    before the model is built (a value the user set is kept)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def build_model(cfg: TrainConfig, plan: Plan, device: torch.device):
    """The FlameModel at step 0 (a resume loads the trained weights over it)."""
    from flame.model import FlameModel, text_side

    model = FlameModel(plan.tower_config, text_side(plan.store.manifest))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(plan.init_logit_scale))
    if cfg.tower_init and plan.resume_from is None:
        info = model.visual.init_trunk_from(cfg.tower_init)
        if dist.is_main():
            log.info("trunk initialised from %s (%d tensors)", info["path"], info["loaded"])
    if cfg.lock_image or cfg.lock_image_unlocked:  # before the optimizer and DDP see the parameters
        from flame.train.freeze import lock_trunk

        counts = lock_trunk(model.visual.trunk, cfg.lock_image_unlocked)
        if dist.is_main():
            log.info("trunk locked: %.1fM parameters frozen, %.1fM trainable (last %d blocks)%s",
                     counts["frozen"] / 1e6, counts["trainable"] / 1e6, cfg.lock_image_unlocked,
                     "" if cfg.tower_init else "; the trunk is randomly initialised (no --tower-init)")
    if grad_checkpointing(cfg):
        model.set_grad_checkpointing(True)
    return model.to(device)


def _evaluator(cfg: TrainConfig, plan: Plan, device: torch.device):
    """The --eval hook: rank 0 caches the suite's text vectors now (LLM loaded and freed)."""
    if not cfg.eval:
        return None
    from flame.evaluate.during import TrainEvaluator
    from flame.model import text_side

    return TrainEvaluator.on_rank0(cfg.eval, cfg.eval_every, text_side(plan.store.manifest), plan.steps,
                                   device=str(device), batch_size=cfg.batch_size, workers=min(2, cfg.workers),
                                   progress=cfg.progress)


def error_line(e: BaseException) -> str:
    """The user-facing line of an error, also when a DataLoader worker wrapped it with its traceback
    (the last line then holds the original `FlameError: message`)."""
    last = (str(e).strip().splitlines() or [type(e).__name__])[-1]
    name, sep, rest = last.partition(": ")
    return rest if sep and name.rsplit(".", 1)[-1] in ("FlameError", "RuntimeError") else last


def next_batches(data, n: int) -> list[dict]:
    """The step's `n` micro-batches. A user error on this rank (e.g. its shards hold no usable
    sample) is shared with every rank before anyone enters the step's collectives, so all stop
    together: one agreement (a round trip on the CPU side channel) per step, not per micro-batch."""
    batches, error = [], None
    try:
        for _ in range(n):
            batches.append(next(data))
    except FlameError as e:
        error = error_line(e)
    except RuntimeError as e:
        if "found no usable samples" not in str(e):
            raise
        error = error_line(e)
    dist.check_errors(error)
    return batches
