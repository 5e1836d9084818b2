"""SugarCrepe and Winoground fixtures in their distributed layouts (EVAL.md section 3), and the
protocol computed by brute force on a model's own vectors (one image, one caption at a time)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

SUBSETS = ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj")
WORDS = "a the dog cat man woman child car tree house red blue green small large on in with and".split()


def noise_png(seed: int, mode: str = "RGB", size: int = 40) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size, size + seed % 7, len(mode)), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def sentence(rng: np.random.Generator, n: int = 6) -> str:
    return " ".join(rng.choice(WORDS, n))


def sugarcrepe_root(root: Path, items: int = 4, seed: int = 0) -> Path:
    """root/val2017/*.jpg names (PNG bytes) and root/<subset>.json keyed by non-contiguous string
    indices; images are shared between subsets, and one item's negative equals its caption (a tie)."""
    rng = np.random.default_rng(seed)
    (root / "val2017").mkdir(parents=True)
    names = [f"{i:012d}.jpg" for i in (139, 285, 632, 724, 776, 785)]
    for k, name in enumerate(names):
        (root / "val2017" / name).write_bytes(noise_png(k))
    for s_i, subset in enumerate(SUBSETS):
        data, key = {}, 0
        for j in range(items + s_i % 3):
            key += 1 + j % 3  # 1, 3, 6, ...: keys skip numbers
            cap = sentence(rng)
            neg = cap if (s_i, j) == (1, 0) else sentence(rng)
            data[str(key)] = {"filename": names[(s_i + 2 * j) % len(names)], "caption": cap, "negative_caption": neg}
        (root / f"{subset}.json").write_text(json.dumps(data))
    return root


def sugarcrepe_brute(model, root: Path) -> dict[str, dict]:
    """Per subset: acc (argmax over caption and negative, the lower index on a tie), items, ties."""
    out = {}
    for subset in SUBSETS:
        entries = json.loads((root / f"{subset}.json").read_text())
        right = ties = 0
        for e in entries.values():
            img = model.encode_image([Image.open(root / "val2017" / e["filename"])])[0]
            t = model.encode_text([e["caption"], e["negative_caption"]], prompts="long")
            pos, neg = float((t[0] * img).sum()), float((t[1] * img).sum())
            right += neg <= pos  # argmax: the first maximal index
            ties += pos == neg
        out[subset] = {"acc": right / len(entries), "right": right, "items": len(entries), "ties": ties}
    return out


def winoground_root(root: Path, examples: int = 6, seed: int = 1, tie: bool = True) -> Path:
    """root/data/examples.jsonl + root/data/images/ex_<id>_img_<n>.png, RGBA and RGB PNGs; with
    `tie`, example 0 has two identical captions (every comparison tied)."""
    rng = np.random.default_rng(seed)
    data = root / "data"
    (data / "images").mkdir(parents=True)
    rows = []
    for e in range(examples):
        for n in range(2):
            mode = "RGBA" if (e + n) % 2 == 0 else "RGB"
            (data / "images" / f"ex_{e}_img_{n}.png").write_bytes(noise_png(100 + 2 * e + n, mode))
        c0 = sentence(rng, 5)
        c1 = c0 if (tie and e == 0) else " ".join(reversed(c0.split()))
        rows.append({"id": e, "image_0": f"ex_{e}_img_0", "image_1": f"ex_{e}_img_1", "caption_0": c0,
                     "caption_1": c1, "tag": "Object", "secondary_tag": "", "num_main_preds": 1,
                     "collapsed_tag": "Object"})
    (data / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def winoground_brute(model, root: Path) -> dict:
    """The paper's strict scores and CLIP_benchmark's argmax ones, from s(c, i) one pair at a time."""
    rows = [json.loads(ln) for ln in (root / "data" / "examples.jsonl").read_text().splitlines()]
    sums = dict.fromkeys(("text_score", "image_score", "group_score", "text_acc", "image_acc", "acc"), 0)
    ties = 0
    for r in rows:
        imgs = [model.encode_image([Image.open(root / "data" / "images" / f"{r[f'image_{n}']}.png")])[0]
                for n in range(2)]
        caps = model.encode_text([r["caption_0"], r["caption_1"]], prompts="long")
        s = [[float((caps[c] * imgs[i]).sum()) for i in range(2)] for c in range(2)]  # s[c][i]
        text = s[0][0] > s[1][0] and s[1][1] > s[0][1]
        image = s[0][0] > s[0][1] and s[1][1] > s[1][0]
        # argmax with the first maximal index: image i picks caption 0 unless caption 1 is strictly higher
        text_acc = (s[1][0] <= s[0][0]) and (s[1][1] > s[0][1])
        image_acc = (s[0][1] <= s[0][0]) and (s[1][1] > s[1][0])
        for k, v in (("text_score", text), ("image_score", image), ("group_score", text and image),
                     ("text_acc", text_acc), ("image_acc", image_acc), ("acc", text_acc and image_acc)):
            sums[k] += v
        ties += s[0][0] == s[1][0] or s[1][1] == s[0][1] or s[0][0] == s[0][1] or s[1][1] == s[1][0]
    return {"metrics": {k: v / len(rows) for k, v in sums.items()}, "ties": ties, "examples": len(rows)}
