"""The image-vector cache of `flame eval`: read through the weights-only loader; a damaged
entry is recomputed with a warning, never fatal."""

from __future__ import annotations

import logging
from pathlib import PurePosixPath

import torch
from PIL import Image


class _Model:
    """What split_vectors needs of a model: a fingerprint, the eval transform, encode_image."""

    fingerprint, image_size, mean, std, device = "fake", 8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), torch.device("cpu")

    def __init__(self):
        self.calls = 0

    def transform(self):
        return lambda im: torch.full((3, 8, 8), float(im.getpixel((0, 0))[0]) / 255)

    def encode_image(self, images):
        self.calls += 1
        return images.flatten(1)[:, :4]


def _folder(root):
    for c, shade in (("red", 200), ("blue", 50)):
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (shade + i, 0, 0)).save(root / c / f"{i}.png")
    (root / "zeroshot_classification_templates.txt").write_text("a {c}\n")
    return root


def test_damaged_cache_entry_is_recomputed_with_a_warning(tmp_path, caplog):
    from flame.evaluate import load_dataset
    from flame.evaluate.images import split_vectors

    ds = load_dataset(_folder(tmp_path / "set"))
    model, cache = _Model(), tmp_path / "cache"
    first = split_vectors(model, ds, workers=0, cache_dir=cache, progress=False)
    (entry,) = cache.glob("*.pt")
    again = split_vectors(model, ds, workers=0, cache_dir=cache, progress=False)
    assert model.calls == 1 and torch.equal(first.vectors, again.vectors)  # read back, not recomputed

    for damage in (b"not a torch file", None):
        if damage is None:  # a valid file of the wrong shape
            torch.save({"vectors": torch.zeros(1, 4)}, entry)
        else:
            entry.write_bytes(damage)
        calls = model.calls
        with caplog.at_level(logging.WARNING, logger="flame.evaluate"):
            caplog.clear()
            redone = split_vectors(model, ds, workers=0, cache_dir=cache, progress=False)
        assert model.calls > calls and torch.equal(redone.vectors, first.vectors) and bool(redone.ok.all())
        assert any("ignoring unreadable image cache" in r.message for r in caplog.records)
        assert split_vectors(model, ds, workers=0, cache_dir=cache, progress=False).vectors.shape == (4, 4)


def test_a_cache_entry_that_would_run_code_is_refused_and_recomputed(tmp_path, caplog):
    from flame.evaluate import load_dataset
    from flame.evaluate.images import split_vectors

    ds = load_dataset(_folder(tmp_path / "set"))
    model, cache = _Model(), tmp_path / "cache"
    split_vectors(model, ds, workers=0, cache_dir=cache, progress=False)
    (entry,) = cache.glob("*.pt")
    torch.save({"vectors": PurePosixPath("x"), "ok": None}, entry)  # not plain tensor data
    with caplog.at_level(logging.WARNING, logger="flame.evaluate"):
        split_vectors(model, ds, workers=0, cache_dir=cache, progress=False)
    assert model.calls == 2
    assert any("refused to load image cache" in r.message for r in caplog.records)
