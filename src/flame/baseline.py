"""The CLIP baseline of `flame demo`: the same image tower trained from scratch against a text
transformer that is trained with it (open_clip's `TextTransformer`, its BPE tokenizer and its
standard contrastive loss `ClipLoss`), on the short captions.

What is held equal to the FLAME run, so that only the text side differs: the image tower
config (trunk, per-token projector to D, pooling), the training stream (same shards, crops,
order and seed: `flame.data.images`' loader, joined with the same store only so that the
batches are identical; the stored vectors are not used), batch size, steps, learning-rate
schedule and optimizer settings. The image side is saved as a `FlameModel` folder, so the
evaluation code reads it exactly like a FLAME checkpoint; `ClipText` supplies its texts.

Folder written by `train_baseline` (`done.json` last, so a run that stopped is redone):
    OUT/image/            FlameModel (model.safetensors + config.json) of the image side
    OUT/text.safetensors  text transformer + logit scale
    OUT/log.jsonl         {"step", "loss", "lr", "logit_scale"} every log_every steps
    OUT/done.json         the settings it was trained with
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flame.errors import FlameError
from flame.fileio import write_atomic

log = logging.getLogger("flame.baseline")

VOCAB = 49408  # open_clip's SimpleTokenizer (its BPE file ships inside the open_clip package)


@dataclass
class ClipTextConfig:
    context_length: int = 32  # short captions are ~15 BPE tokens
    width: int = 128
    heads: int = 4
    layers: int = 3


@dataclass
class BaselineConfig:
    shards: list[str]
    store: str  # the FLAME run's store: only to build the identical image stream
    out: str
    tower: dict  # TowerConfig.to_dict() of the FLAME run (embed_dim = the LLM's D)
    steps: int
    batch_size: int
    lr: float = 5e-4
    warmup: int = 0
    min_lr: float = 0.0
    weight_decay: float = 0.5
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    crop_scale: tuple[float, float] = (0.9, 1.0)
    seed: int = 0
    workers: int = 1
    log_every: int = 10
    caption_ext: str = "txt"
    text: ClipTextConfig = field(default_factory=ClipTextConfig)
    data: dict = field(default_factory=dict)  # what the caller knows about the data (a changed set retrains)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items() if k != "workers"}


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
            layers=config.layers, output_dim=embed_dim,
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.transformer(tokens).float(), dim=-1)


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


def train_baseline(config: BaselineConfig, progress: bool = True,
                   on_log: Callable[[dict], None] | None = None) -> Path:
    """Train (or find already trained) the CLIP baseline; returns its folder."""
    from open_clip.loss import ClipLoss

    from flame.data.images import StreamConfig, make_loader, normalize_images
    from flame.model import FlameModel
    from flame.store import EmbeddingStore
    from flame.train import lr_lambda, param_groups
    from flame.vision import TowerConfig

    out = Path(config.out)
    if is_complete(out, config):
        return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    torch.manual_seed(config.seed)
    tower_config = TowerConfig.from_dict(config.tower)
    image = FlameModel(tower_config, {"kind": "clip-baseline"})
    text = ClipTextTower(config.text, tower_config.embed_dim)
    captions = _captions(config.shards, config.caption_ext)
    if not captions:
        raise FlameError(f"no {config.caption_ext!r} captions in {', '.join(config.shards)}")
    store = EmbeddingStore(config.store)
    # The 49,408-row token table gets sparse gradients and a lazy Adam (only rows of tokens in the
    # batch move): a dense AdamW step over it would cost more than the whole image tower.
    emb = text.transformer.token_embedding
    emb.sparse = True
    params = param_groups(image.visual, config.weight_decay) + [
        {**g, "params": [q for q in g["params"] if q is not emb.weight]}
        for g in param_groups(text, config.weight_decay)
    ]
    schedule = lr_lambda(config.warmup, config.steps, config.min_lr / config.lr)
    optims = [torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.betas), eps=config.eps),
              torch.optim.SparseAdam([emb.weight], lr=config.lr, betas=tuple(config.betas), eps=config.eps)]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, schedule) for o in optims]
    loss_fn = ClipLoss()
    stream = StreamConfig(shards=list(config.shards), store=str(store.path), image_size=image.image_size,
                          batch_size=config.batch_size, m=1, eligible=[0], seed=config.seed,
                          crop_scale=tuple(config.crop_scale))
    loader = iter(make_loader(stream, config.workers))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=config.steps * config.batch_size, unit="img", unit_scale=True, desc="clip baseline",
                   dynamic_ncols=True, disable=None)
    logf = (out / "log.jsonl").open("w")
    image.train()
    text.train()
    t0, losses = time.perf_counter(), []
    try:
        for step in range(1, config.steps + 1):
            batch = next(loader)
            images = normalize_images(batch["images"], image.mean, image.std)
            tokens = text.tokenize([captions[k] for k in batch["keys"]])
            img = image.visual(images)
            txt = text(tokens)
            loss = loss_fn(img, txt, text.logit_scale.exp())
            for o in optims:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o, sc in zip(optims, scheds):
                o.step()
                sc.step()
            with torch.no_grad():
                text.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
            if bar is not None:
                bar.update(config.batch_size)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if step % config.log_every == 0 or step == config.steps:
                record = {"step": step, "loss": sum(losses) / len(losses), "lr": scheds[0].get_last_lr()[0],
                          "logit_scale": float(text.logit_scale.exp()),
                          "images_per_s": step * config.batch_size / (time.perf_counter() - t0)}
                losses = []
                logf.write(json.dumps(record) + "\n")
                logf.flush()
                if on_log:
                    on_log(record)
    finally:
        logf.close()
        if bar is not None:
            bar.close()
        del loader
    image.eval()
    image.save(out / "image")
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in text.state_dict().items()}
    save_file(state, str(out / "text.safetensors.tmp"))
    (out / "text.safetensors.tmp").replace(out / "text.safetensors")
    write_atomic(out / "done.json", json.dumps({"config": config.to_dict(),
                                                "seconds": time.perf_counter() - t0}, indent=2) + "\n")
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
