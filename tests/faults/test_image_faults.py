"""Hostile image members: another format behind a `.jpg` name never reaches its decoder,
decompression bombs are refused before decoding, and the training stream skips and counts both."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from flame.data import images
from flame.data.images import MAX_PIXELS, StreamConfig, TrainStream, load_image
from flame.store import EmbeddingStore

# a minimal EPS file: PIL recognises it by content whatever the member is called, and would
# hand it to Ghostscript to render
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\nnewpath 0 0 moveto 16 16 lineto stroke\n"


def _png(width: int, height: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), 1 if mode == "1" else (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A ~12 KB PNG of 9500 x 9500 pixels: above PIL's own limit (which only warns) and ours."""
    return _png(9500, 9500, mode="1")


@pytest.fixture
def eps_spy(monkeypatch):
    calls = []
    real_open = EpsImagePlugin.EpsImageFile._open

    def spy(self, *a, **kw):
        calls.append("open")
        return real_open(self, *a, **kw)

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", spy)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **kw: calls.append("ghostscript"))
    return calls


def test_eps_payload_never_reaches_the_eps_decoder(eps_spy):
    with pytest.raises(images.UndecodableImage, match="not a JPEG/PNG/WEBP/BMP image"):
        load_image(EPS, 32, random.Random(0))
    assert eps_spy == []
    for fmt in ("JPEG", "PNG", "WEBP", "BMP"):  # the expected formats still decode
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), (1, 2, 3)).save(buf, format=fmt)
        assert load_image(buf.getvalue(), 32, None).shape == (3, 32, 32)
    gif = io.BytesIO()
    Image.new("RGB", (40, 30)).save(gif, format="GIF")
    with pytest.raises(images.UndecodableImage):
        load_image(gif.getvalue(), 32, None)


def test_decompression_bomb_is_refused_before_decoding(bomb, monkeypatch):
    assert Image.MAX_IMAGE_PIXELS < 9500 * 9500 and MAX_PIXELS <= Image.MAX_IMAGE_PIXELS
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self, *a: decoded.append(self.size))
    with pytest.raises(images.UndecodableImage, match="9500x9500 pixels is over the limit"):
        load_image(bomb, 32, None)
    assert decoded == []
    with pytest.raises(images.UndecodableImage, match="over the limit of 2,000"):
        load_image(_png(50, 50), 32, None, max_pixels=2000)


def test_train_stream_skips_and_counts_hostile_images(tmp_path, bomb, eps_spy):
    import webdataset as wds

    k, d = 2, 8
    manifest = {
        "format": "flame-embeddings",
        "version": 1,
        "llm": {"spec": "t", "fingerprint": "f"},
        "layer": [1],
        "positions": "restart",
        "prompt_sets": [],
        "facets": ["a/0", "a/1"],
        "k": k,
        "dim": d,
        "dtype": "fp16",
        "normalized": True,
    }
    members = {"good0": _png(40, 40), "eps": EPS, "bomb": bomb, "big": _png(120, 100), "good1": _png(30, 50)}
    store = EmbeddingStore.create(tmp_path / "st", manifest)
    v = np.random.default_rng(0).standard_normal((len(members), k, d)).astype(np.float32)
    store.write_shard("s", list(members), v / np.linalg.norm(v, axis=-1, keepdims=True))
    with wds.TarWriter(str(tmp_path / "s.tar")) as w:
        for key, data in members.items():
            w.write({"__key__": key, "jpg": data})
    config = StreamConfig(
        shards=[str(tmp_path / "s.tar")],
        store=str(tmp_path / "st"),
        image_size=16,
        batch_size=2,
        m=1,
        eligible=[0, 1],
        max_pixels=10_000,  # "big" (12,000 pixels) is over it
    )
    batch = next(iter(TrainStream(config)))
    assert [key.split("/")[1] for key in batch["keys"]] == ["good0", "good1"]
    assert batch["state"]["undecodable"] == 3 and batch["images"].shape == (2, 3, 16, 16)
    assert eps_spy == []


def test_evaluation_decoder_follows_the_same_rules(eps_spy, bomb, tmp_path):
    """`flame eval` / `flame search` images: an EPS named .jpg and a bomb are skipped, not decoded."""
    from flame.evaluate.images import _decode

    def transform(img):
        return np.asarray(img.convert("RGB").resize((8, 8)))

    path = tmp_path / "photo.jpg"
    path.write_bytes(EPS)
    for data in (EPS, str(path), bomb):
        _, ok = _decode(data, transform, 8)
        assert not ok
    assert eps_spy == []
    image, ok = _decode(_png(20, 10), transform, 8)
    assert ok and image.shape == (8, 8, 3)
