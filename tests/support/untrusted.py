"""Model folders and caption tables as a stranger might share them (tests of issue 18 items 1, 2, 7, 13)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from flame.model import FlameModel
from flame.prompts import PROMPT_SETS
from flame.vision import TowerConfig

DIM = 32


def text_side(llm: Path | str, fingerprint: str | None, layer=(2,)) -> dict:
    """The text block `flame embed` records for the tiny LLM (raw and short prompt sets)."""
    sets = [{**PROMPT_SETS[n].to_dict(), "source": "txt"} for n in ("raw", "short")]
    return {"llm": {"spec": str(llm), "fingerprint": fingerprint}, "layer": list(layer), "positions": "restart",
            "prompt_sets": sets, "facets": [f"{s['name']}/{i}" for s in sets for i in range(len(s["facets"]))],
            "k": sum(len(s["facets"]) for s in sets), "dim": DIM, "normalized": True}


def model_folder(path: Path, text: dict, seed: int = 0, **tower) -> Path:
    """A saved FlameModel (vit-tiny at 32 pixels) with this text side."""
    torch.manual_seed(seed)
    cfg = TowerConfig(**{"tower": "vit-tiny", "embed_dim": DIM, "proj_hidden": 32, "image_size": 32, **tower})
    FlameModel(cfg, text).save(path)
    return path


def edit_config(folder: Path, edit) -> Path:
    """Rewrite folder/config.json through `edit(cfg)` (which changes it in place)."""
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def caption_table(root: Path, captions: list[str], seed: int = 0) -> Path:
    """A JSONL caption table, one 40-pixel random photo per caption. json.dumps writes a lone
    surrogate as its escape, as scraped JSONL has it; json.loads gives it back."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    lines = []
    for i, cap in enumerate(captions):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        lines.append(json.dumps({"image": f"img/{i}.png", "caption": cap}))
    path = root / "captions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
