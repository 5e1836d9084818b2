"""Evaluation inputs a stranger could hand `flame eval`, built for real on disk: class folders and
webdataset shards with raw (bytes) names, tables, and a tiny randomly initialised model folder
whose text side is the tiny test LLM (so `flame eval --model FOLDER` runs end to end in seconds)."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flame.data.synthetic import COLORS

TEMPLATES = "a photo of a {c}.\n"
COLOURS = {"red": (220, 20, 20), "blue": (20, 20, 220)}


def png(colour: tuple[int, int, int], size: tuple[int, int] = (24, 24), seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour)[None, None] + rng.integers(-10, 10, (size[1], size[0], 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def class_folder(root: Path, per_class: int = 3, names: dict[str, list[bytes]] | None = None) -> Path:
    """root/CLASS/NAME with PNG bytes; `names` gives raw file names (bytes) per class."""
    for c, colour in COLOURS.items():
        d = root / c
        d.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate((names or {}).get(c) or [f"{i}.png".encode() for i in range(per_class)]):
            with open(os.path.join(os.fsencode(d), name), "wb") as f:
                f.write(png(colour, seed=i))
    (root / "zeroshot_classification_templates.txt").write_text(TEMPLATES)
    return root


def add_member(tf: tarfile.TarFile, name: str | bytes, data: bytes) -> None:
    """A member called `name` (bytes: stored as those bytes, whatever they decode to)."""
    info = tarfile.TarInfo(os.fsdecode(name) if isinstance(name, bytes) else name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def wds_set(root: Path, samples: list[tuple[str | bytes, str]], mode: str = "w", tar_name: str = "0.tar") -> Path:
    """CLIP_benchmark's layout with one shard of (key, cls text) samples, each with a PNG."""
    (root / "test").mkdir(parents=True, exist_ok=True)
    colours = list(COLOURS.values())
    with tarfile.open(root / "test" / tar_name, mode, format=tarfile.GNU_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tf:
        for i, (key, cls) in enumerate(samples):
            k = key if isinstance(key, bytes) else key.encode()
            add_member(tf, k + b".png", png(colours[i % 2], seed=i))
            add_member(tf, k + b".cls", cls.encode())
    (root / "test" / "nshards.txt").write_text("1\n")
    (root / "classnames.txt").write_text("\n".join(COLOURS) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text(TEMPLATES)
    return root


def tiny_model_folder(folder: Path, llm_dir: Path) -> Path:
    """A FlameModel (vit-tiny, 32 px) saved as a model folder, text side = the tiny LLM's layer 2."""
    from flame.llm import llm_fingerprint, load_llm
    from flame.model import FlameModel
    from flame.prompts import PROMPT_SETS
    from flame.vision import TowerConfig

    llm, _ = load_llm(str(llm_dir), device="cpu")
    sets = [{**PROMPT_SETS["raw"].to_dict(), "source": "txt"}]
    text = {"llm": {"spec": str(llm_dir), "fingerprint": llm_fingerprint(llm)}, "layer": [2], "positions": "restart",
            "prompt_sets": sets, "facets": [f"raw/{i}" for i in range(len(sets[0]["facets"]))],
            "k": len(sets[0]["facets"]), "dim": 32, "normalized": True}
    torch.manual_seed(0)
    FlameModel(TowerConfig("vit-tiny", embed_dim=32, proj_hidden=32, image_size=32), text).save(folder)
    return folder


PALETTE = COLORS  # flame.data.synthetic's six colours: `colour_word_llm` separates their names


def palette_images(n: int) -> list[tuple[str, bytes]]:
    """n (colour name, PNG bytes) pairs cycling through PALETTE's six colours, each its own noise."""
    names = list(PALETTE)
    return [(names[i % len(names)], png(PALETTE[names[i % len(names)]], seed=100 + i)) for i in range(n)]


def palette_folder(root: Path, n: int = 12, template: str = "a photo of a {c}.") -> Path:
    """A class-folder set root/COLOUR/i.png over PALETTE, with one zero-shot template."""
    for i, (name, data) in enumerate(palette_images(n)):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / f"{i:03d}.png").write_bytes(data)
    (root / "zeroshot_classification_templates.txt").write_text(template + "\n")
    return root


def palette_wds(root: Path, kind: str, n: int = 24, shards: int = 2) -> Path:
    """CLIP_benchmark's webdataset layout (test/nshards.txt, test/{0..}.tar; classnames.txt and
    templates, or dataset_type.txt = retrieval) over PALETTE: classification samples carry their
    colour's index (`cls`), retrieval samples two captions no other sample has (`txt`)."""
    import webdataset as wds

    (root / "test").mkdir(parents=True)
    items = palette_images(n)
    per = -(-n // shards)
    for j in range(shards):
        with wds.TarWriter(str(root / "test" / f"{j}.tar")) as sink:
            for i in range(j * per, min(n, (j + 1) * per)):
                name, data = items[i]
                rec = {"__key__": f"s{i:05d}", "png": data}
                if kind == "retrieval":
                    rec["txt"] = (f"a {name} square photographed on day {i} against a plain background\n"
                                  f"picture number {i} showing one {name} square")
                else:
                    rec["cls"] = str(list(PALETTE).index(name))
                sink.write(rec)
    (root / "test" / "nshards.txt").write_text(f"{shards}\n")
    if kind == "retrieval":
        (root / "dataset_type.txt").write_text("retrieval\n")
    else:
        (root / "classnames.txt").write_text("\n".join(PALETTE) + "\n")
        (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\nan image of a {c}.\n")
    return root


def colour_word_llm(src: Path, dst: Path) -> Path:
    """The tiny LLM (same architecture and tokenizer) rewired so that a caption's vector is decided by
    its colour word: the tokens unique to colour c embed as the c-th basis vector, every other token
    (prompt, shape, filler) as zero; attention is uniform (q = k = 0) with value/output maps that
    pass the first dimensions through; MLPs are off. Every hidden state of a caption is then a
    multiple of its colour's basis vector, so the six colours' vectors are orthogonal. (At its
    random init the tiny LLM gives these captions near-identical vectors, pairwise cosine 0.99, which
    a few seconds of training cannot separate.)"""
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from flame.prompts import PROMPT_SETS

    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(dst)
    model = LlamaForCausalLM.from_pretrained(dst)
    cfg = model.config
    head = cfg.hidden_size // cfg.num_attention_heads
    rep = cfg.num_attention_heads // cfg.num_key_value_heads
    raw = PROMPT_SETS["raw"]
    shared = set(tok(raw.prefix.replace("{cap}", "a circle square in the center.") + " ".join(raw.facets))["input_ids"])
    per_word = [set(tok(" " + w)["input_ids"]) - shared for w in COLORS]
    own = [{t for t in ids if not any(t in o for j, o in enumerate(per_word) if j != i)}
           for i, ids in enumerate(per_word)]
    assert all(own)  # every colour keeps a token of its own
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        for c, ids in enumerate(own):
            model.model.embed_tokens.weight[sorted(ids), c] = 1.0
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.q_proj.weight.zero_()
            attn.k_proj.weight.zero_()
            attn.v_proj.weight.copy_(torch.eye(*attn.v_proj.weight.shape))  # value = the first kv dims
            o = torch.zeros_like(attn.o_proj.weight)  # heads repeat kv heads `rep` times: average them back
            for kv in range(cfg.num_key_value_heads):
                for r in range(rep):
                    h = kv * rep + r
                    o[kv * head:(kv + 1) * head, h * head:(h + 1) * head] = torch.eye(head) / rep
            attn.o_proj.weight.copy_(o)
            layer.mlp.down_proj.weight.zero_()
    model.save_pretrained(dst)
    return dst
