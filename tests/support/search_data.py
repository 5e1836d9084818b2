"""Photo folders and models for `flame search` tests: a real saved tiny model (what the command
loads), and a stand-in model plus empty photo files for tests at scale (no image is decoded:
`fake_decoding` replaces the decoder the indexer calls, the rest of the indexer runs as it is)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image


def save_tiny_model(folder: Path, tiny_llm_dir: Path) -> Path:
    """A saved model whose text side points at the tiny LLM (as flame train would record it)."""
    from flame.llm import llm_fingerprint, load_llm
    from flame.model import FlameModel
    from flame.prompts import PROMPT_SETS
    from flame.vision import TowerConfig

    llm, _ = load_llm(str(tiny_llm_dir), device="cpu")
    sets = [{**PROMPT_SETS[n].to_dict(), "source": "txt"} for n in ("raw", "long")]
    text = {"llm": {"spec": str(tiny_llm_dir), "fingerprint": llm_fingerprint(llm)}, "layer": [2],
            "positions": "restart", "prompt_sets": sets, "facets": [], "k": 8, "dim": 32, "normalized": True}
    torch.manual_seed(0)
    FlameModel(TowerConfig("vit-tiny", embed_dim=32, proj_hidden=32, image_size=32), text).save(folder)
    return folder


def photo(path: Path, seed: int, size=(48, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format="PNG")
    return path


class FakeModel:
    """What the indexer and the query use of a FlameModel; the vector of a photo is a function
    of its name (so a test can recompute it), unit length, D wide."""

    image_size = 4
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)
    fingerprint = "fake-model"

    def __init__(self, dim: int):
        self.tower_config = SimpleNamespace(embed_dim=dim)
        self.dim = dim

    def transform(self):
        return None

    def encode_image(self, images):  # images: the name seeds `fake_decoding` handed out
        return torch.from_numpy(np.stack([vector(int(s), self.dim) for s in images]))

    def encode_text(self, texts, prompts=None):
        return torch.from_numpy(np.stack([vector(int(hashlib.sha1(t.encode()).hexdigest()[:8], 16), self.dim)
                                          for t in texts]))


def vector(seed: int, dim: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def name_seed(path: Path) -> int:
    return int(hashlib.sha1(Path(path).name.encode("utf-8", "surrogateescape")).hexdigest()[:8], 16)


def fake_decoding(monkeypatch) -> None:
    """The indexer's decoder gives each photo its name's seed instead of pixels."""
    import flame.search.index as index

    monkeypatch.setattr(index, "decode_or_blank", lambda path, transform, size: (torch.tensor(name_seed(path)), True))


def empty_photos(root: Path, n: int, width: int = 40) -> list[str]:
    """n empty `*.jpg` files, names `width` characters long, in folders of 1,000 (existing ones left alone)."""
    rels = []
    for i in range(n):
        rel = f"d{i // 1000:04d}/" + f"{i:08d}".rjust(width - 4, "p") + ".jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if not (root / rel).exists():
            (root / rel).touch()
        rels.append(rel)
    return rels
