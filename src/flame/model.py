"""FlameModel: the trained image side plus the description of the text side it matches.

A saved model is a folder with `model.safetensors` (tower, projector, logit scale/bias) and
`config.json` = {"format": "flame-model", "version": 1, "tower": TowerConfig, "text": the
store manifest's text side (LLM spec + fingerprint, layer, positions, prompt sets, facets,
k, dim), "image": {"size", "mean", "std"}}. Evaluation and `encode_text` come later.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from flame.errors import FlameError
from flame.fileio import write_atomic
from flame.loss import INIT_LOGIT_BIAS, INIT_LOGIT_SCALE, clamp_logit_scale_
from flame.vision import ImageTower, TowerConfig

FORMAT = "flame-model"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TEXT_KEYS = ("llm", "layer", "positions", "prompt_sets", "facets", "k", "dim", "normalized")


def text_side(manifest: dict) -> dict:
    """The part of a store manifest that defines the text embedding space."""
    return {k: manifest[k] for k in TEXT_KEYS if k in manifest}


class FlameModel(nn.Module):
    def __init__(self, tower: TowerConfig, text: dict | None = None):
        super().__init__()
        self.tower_config = tower
        self.text = dict(text or {})
        self.visual = ImageTower(tower)
        self.logit_scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))
        self.logit_bias = nn.Parameter(torch.tensor(INIT_LOGIT_BIAS))

    # -- description --------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.visual.image_size

    @property
    def mean(self) -> tuple:
        return tuple(self.visual.trunk.mean)

    @property
    def std(self) -> tuple:
        return tuple(self.visual.trunk.std)

    def config(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "tower": self.tower_config.to_dict(),
            "text": self.text,
            "image": {"size": self.image_size, "mean": list(self.mean), "std": list(self.std)},
        }

    # -- compute ------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"image": self.visual(images), "logit_scale": self.logit_scale, "logit_bias": self.logit_bias}

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images [B,3,S,S] -> L2-normalised embeddings [B, D] (float32)."""
        return self.visual(images).float()

    def clamp_(self) -> None:
        clamp_logit_scale_(self.logit_scale)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)

    # -- files --------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        """Write model.safetensors + config.json into `folder` (created)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS), metadata={"format": FORMAT})
        write_atomic(folder / CONFIG, json.dumps(self.config(), indent=2) + "\n")

    @staticmethod
    def read_config(folder: str | Path) -> dict:
        path = Path(folder) / CONFIG
        if not path.is_file():
            raise FlameError(f"{folder} is not a FLAME model folder (no {CONFIG})")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise FlameError(f"{path} is not valid JSON: {e}") from e
        if cfg.get("format") != FORMAT:
            raise FlameError(f"{path} is not a FLAME model config (format {cfg.get('format')!r})")
        return cfg

    @classmethod
    def from_config(cls, cfg: dict) -> FlameModel:
        return cls(TowerConfig.from_dict(cfg["tower"]), cfg.get("text"))

    @classmethod
    def load(cls, folder: str | Path, map_location: str | torch.device = "cpu") -> FlameModel:
        from safetensors.torch import load_file

        cfg = cls.read_config(folder)
        model = cls.from_config(cfg)
        weights = Path(folder) / WEIGHTS
        if not weights.is_file():
            raise FlameError(f"{folder} has no {WEIGHTS}")
        model.load_state_dict(load_file(str(weights), device=str(map_location)))
        return model
