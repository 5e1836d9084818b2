"""The CLIP baseline of `flame demo`: the same image tower trained from scratch against a text
transformer that is trained with it (open_clip's `TextTransformer`, its BPE tokenizer and its
standard contrastive loss `ClipLoss`), on the short captions.

What is held equal to the FLAME run, so that only the text side differs: the image tower
config (trunk, per-token projector to D, pooling), the training stream (same shards, crops,
order and seed: `flame.data.images`' loader, joined with the same store only so that the
batches are identical; the stored vectors are not used), batch size, steps, learning-rate
schedule and optimizer settings. It is trained by `flame train`'s own loop (`ClipTrainer`, a
`flame.train.loop.Trainer` with the CLIP model, loss and optimizers), planned and checked by
`flame.train.plan` from a `TrainConfig` (`BaselineConfig.recipe`). The image side is saved as a
`FlameModel` folder, so the evaluation code reads it exactly like a FLAME checkpoint; `ClipText`
supplies its texts. Its text tower is trained, so gradient accumulation (the recipe's `accum`) stays
per micro-batch (each micro-batch's ClipLoss over its own captions, averaged), not `flame train`'s
exact accumulation, which needs constant texts.

Folder written by `train_baseline` (`done.json` last, so a run that stopped is redone):
    OUT/image/            FlameModel (model.safetensors + config.json) of the image side
    OUT/text.safetensors  text transformer + logit scale
    OUT/log.jsonl         {"step", "loss", "lr", "logit_scale", "images_per_s"} every log_every steps
    OUT/done.json         the settings it was trained with
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flame.distributed import resolve_device
from flame.errors import FlameError
from flame.fileio import replace, write_atomic
from flame.train import accumulate
from flame.train.config import TrainConfig, validate
from flame.train.loop import Trainer
from flame.train.optim import adamw, param_groups, schedule
from flame.train.plan import plan

VOCAB = 49408  # open_clip's SimpleTokenizer (its BPE file ships inside the open_clip package)
# the TrainConfig settings the baseline shares with the FLAME run (and records in done.json)
SHARED = ("steps", "batch_size", "lr", "warmup", "min_lr", "weight_decay", "betas", "eps", "crop_scale", "seed",
          "log_every")


@dataclass
class ClipTextConfig:
    context_length: int = 32  # short captions are ~15 BPE tokens
    width: int = 128
    heads: int = 4
    layers: int = 3


class BaselineConfig:
    """What the baseline needs beyond the training recipe, plus the recipe itself as a validated
    `TrainConfig` (`recipe`): every other keyword is a TrainConfig setting (steps, batch_size, lr,
    warmup, weight_decay, seed, workers, ...), so none is declared twice.

    shards: the FLAME run's image shards; store: its store (only to build the identical image
    stream); tower: the FLAME run's TowerConfig.to_dict(); data: what the caller knows about the
    data (a changed set retrains)."""

    def __init__(self, shards: Sequence[str], store: str, out: str, tower: dict,
                 text: ClipTextConfig | None = None, caption_ext: str = "txt", data: dict | None = None, **recipe):
        self.shards, self.store, self.out = [str(s) for s in shards], str(store), str(out)
        self.tower, self.caption_ext, self.data = dict(tower), caption_ext, dict(data or {})
        self.text = text or ClipTextConfig()
        given = {"warmup": 0, "workers": 1, "device": "cpu", "tensorboard": False, **recipe}
        self.recipe = validate(TrainConfig(
            data=self.shards, embeddings=self.store, out=self.out, tower=self.tower.get("tower", "vit-b-16"),
            image_size=self.tower.get("image_size"), proj_hidden=self.tower.get("proj_hidden"),
            pool_first=bool(self.tower.get("pool_first")), facets="0", positives=1, **given))

    def to_dict(self) -> dict:
        """The settings done.json records (the same keys as before the recipe was a TrainConfig)."""
        shared = {k: getattr(self.recipe, k) for k in SHARED}
        d = {"shards": self.shards, "store": self.store, "out": self.out, "tower": self.tower, **shared,
             "caption_ext": self.caption_ext, "text": asdict(self.text), "data": self.data}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


class ClipTextTower(nn.Module):
    """open_clip's text transformer + tokenizer; outputs L2-normalised [N, D]."""

    def __init__(self, config: ClipTextConfig, embed_dim: int):
        super().__init__()
        from open_clip.tokenizer import SimpleTokenizer
        from open_clip.transformer import TextTransformer

        self.config = config
        self.tokenizer = SimpleTokenizer(context_length=config.context_length)
        self.transformer = TextTransformer(
            context_length=config.context_length, vocab_size=VOCAB, width=config.width, heads=config.heads,
            layers=config.layers, output_dim=embed_dim, pool_type="argmax",
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """[N, L] token ids, cut after the texts' last end-of-text (L <= the context): the mask is
        causal, so the padding after it never reaches the pooled end-of-text feature. The demo's
        ~15-token captions in a context of 32 cost the text tower half the work this way."""
        tokens = self.tokenizer(list(texts))
        return tokens[:, : int(tokens.argmax(-1).max()) + 1] if len(tokens) else tokens

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """open_clip's `TextTransformer.forward` (causal mask, end-of-text pooling: the largest id)
        on [N, L] tokens of any L <= the context, which its own forward does not accept."""
        from open_clip.transformer import text_global_pool

        tt, n = self.transformer, tokens.shape[1]
        x, mask = tt._embeds(tokens)
        x = tt.ln_final(tt.transformer(x, attn_mask=None if mask is None else mask[..., :n, :n]))
        pooled = text_global_pool(x, tokens, pool_type=tt.pool_type)
        proj = tt.text_projection
        pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        return F.normalize(pooled.float(), dim=-1)


class ClipText:
    """`encode(texts, prompts, progress)` for `flame.evaluate.evaluate(..., text=...)`; CLIP has
    no prompt sets, so `prompts` is ignored."""

    def __init__(self, tower: ClipTextTower, batch_size: int = 256):
        self.tower = tower.eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def encode(self, texts: Sequence[str], prompts=None, progress: bool = False) -> torch.Tensor:
        out = [self.tower(self.tower.tokenize(texts[i : i + self.batch_size]).to(self.tower.device))
               for i in range(0, len(texts), self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.tower.transformer.text_projection.shape[1])


def _captions(shards: Sequence[str], ext: str) -> dict[str, str]:
    """'shard/key' -> caption, as the training stream names its samples."""
    from flame.data.captions import read_shard_captions
    from flame.data.shards import shard_name

    table = {}
    for path in shards:
        caps = read_shard_captions(path, [ext])
        name = shard_name(Path(path))
        table.update({f"{name}/{k}": v for k, v in caps.text[ext].items()})
    return table


def is_complete(out: str | Path, config: BaselineConfig) -> bool:
    done = Path(out) / "done.json"
    try:
        return json.loads(done.read_text())["config"] == json.loads(json.dumps(config.to_dict()))
    except (OSError, ValueError, KeyError):
        return False


class ClipTrainer(Trainer):
    """`flame train`'s loop, state, guard and log with the CLIP pieces: image tower + text
    transformer, ClipLoss, and a lazy (sparse) Adam for the 49,408-row token table, whose dense
    AdamW step would cost more than the whole image tower. Not resumable: `finish` saves once."""

    desc = "clip baseline"

    def __init__(self, cfg: TrainConfig, plan_, device: torch.device, config: BaselineConfig,
                 captions: dict[str, str], on_log: Callable[[dict], None] | None):
        self.config, self.captions, self.on_log = config, captions, on_log
        self.started = time.perf_counter()
        super().__init__(cfg, plan_, device)

    def build(self) -> None:
        from open_clip.loss import ClipLoss

        from flame.model import FlameModel

        cfg, plan_ = self.cfg, self.plan
        self.model = FlameModel(plan_.tower_config, {"kind": "clip-baseline"})
        self.text = ClipTextTower(self.config.text, plan_.tower_config.embed_dim)
        self.trained = self.ddp = nn.ModuleList([self.model.visual, self.text]).to(self.device)
        self.model.to(self.device)
        emb = self.text.transformer.token_embedding
        emb.sparse = True
        groups = param_groups(self.model.visual, cfg.weight_decay) + [
            {**g, "params": [q for q in g["params"] if q is not emb.weight]}
            for g in param_groups(self.text, cfg.weight_decay)
        ]
        self.optimizers = [adamw(groups, cfg.lr, cfg.betas, cfg.eps),
                           torch.optim.SparseAdam([emb.weight], lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)]
        self.schedulers = [schedule(o, plan_.warmup, plan_.steps, cfg.lr, cfg.min_lr) for o in self.optimizers]
        self.loss_fn = ClipLoss()
        self.bf16 = False
        # every caption tokenized once (BPE cost ~0.2 ms a caption, each seen once an epoch)
        keys = list(self.captions)
        self.token_row = {k: i for i, k in enumerate(keys)}
        self.tokens = self.text.tokenize([self.captions[k] for k in keys])

    def loss(self, batch: dict) -> torch.Tensor:
        from flame.data.images import normalize_images

        images = normalize_images(batch["images"].to(self.device), self.model.mean, self.model.std)
        tokens = self.tokens[[self.token_row[k] for k in batch["keys"]]].to(self.device)
        return self.loss_fn(self.model.visual(images), self.text(tokens), self.text.logit_scale.exp())

    def backward(self, micro: list[dict]) -> torch.Tensor:
        """Each micro-batch its own ClipLoss (its own captions), averaged: the text tower is trained,
        so the texts are not constant and `flame train`'s exact accumulation does not apply."""
        return accumulate.per_micro(self, micro)

    def after_update(self) -> None:
        with torch.no_grad():
            self.text.logit_scale.clamp_(0, math.log(100))

    def record(self, step: int) -> dict:
        return {"step": step, "loss": self.meter.mean_loss(), "lr": self.schedulers[0].get_last_lr()[0],
                "logit_scale": self.text.logit_scale.exp().item(),
                "images_per_s": self.meter.images_per_s(step, self.global_batch), "nonfinite": self.guard.logged()}

    def report(self, record: dict) -> None:
        if self.on_log:
            self.on_log(record)

    def prepare_run_folder(self) -> None:  # OUT is the baseline's own folder (see the module docstring)
        pass

    def describe(self) -> None:
        pass

    def checkpoint(self) -> None:  # saved once, by finish
        pass

    def finish(self) -> None:
        """OUT/image, OUT/text.safetensors, then OUT/done.json (last: a run that stopped is redone)."""
        from safetensors.torch import save_file

        out = Path(self.config.out)
        self.model.eval()
        self.model.save(out / "image")
        state = {k: v.detach().contiguous() for k, v in self.text.state_dict().items()}
        save_file(state, str(out / "text.safetensors.tmp"))
        replace(out / "text.safetensors.tmp", out / "text.safetensors")
        write_atomic(out / "done.json", json.dumps({"config": self.config.to_dict(),
                                                    "seconds": time.perf_counter() - self.started}, indent=2) + "\n")


def train_baseline(config: BaselineConfig, progress: bool = True,
                   on_log: Callable[[dict], None] | None = None) -> Path:
    """Train (or find already trained) the CLIP baseline; returns its folder."""
    from flame.vision import TowerConfig

    out = Path(config.out)
    if is_complete(out, config):
        return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    captions = _captions(config.shards, config.caption_ext)
    if not captions:
        raise FlameError(f"no {config.caption_ext!r} captions in {', '.join(config.shards)}")
    cfg = dataclasses.replace(config.recipe, progress=progress)
    planned = plan(cfg)  # the FLAME run's checks, stream and schedule (m=1 of facet 0: the vectors are unused)
    planned.tower_config = TowerConfig.from_dict(config.tower)
    ClipTrainer(cfg, planned, resolve_device(cfg.device), config, captions, on_log).fit()
    return out


def load_baseline(out: str | Path, device: str = "cpu"):
    """-> (image side as a FlameModel, ClipText) of a trained baseline folder."""
    from safetensors.torch import load_file

    from flame.model import FlameModel

    out = Path(out)
    done = out / "done.json"
    if not done.is_file():
        raise FlameError(f"{out} holds no finished CLIP baseline (no done.json)")
    cfg = json.loads(done.read_text())["config"]
    image = FlameModel.from_pretrained(out / "image", device=device)
    text = ClipTextTower(ClipTextConfig(**cfg["text"]), image.tower_config.embed_dim)
    text.load_state_dict(load_file(str(out / "text.safetensors")))
    return image, ClipText(text.to(device))
