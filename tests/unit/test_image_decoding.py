"""How an image file or member becomes pixels, for evaluation, `flame search` and training alike
(flame.data.images): EXIF orientation applied, 16-bit greyscale scaled rather than clipped, only
regular files read (a FIFO or /dev/zero is refused at once, without blocking or reading)."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from flame.data.images import decode_or_blank, load_image


def _identity(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())


def _upright() -> np.ndarray:
    """A portrait photo as it should be seen: 48 wide, 64 high, red top half, blue bottom half."""
    a = np.zeros((64, 48, 3), dtype=np.uint8)
    a[:32] = (230, 20, 20)
    a[32:] = (20, 20, 230)
    return a


def _phone_jpeg() -> bytes:
    """What a phone writes for that portrait: the sensor's landscape pixels (the upright image
    turned 90 degrees counter-clockwise) and EXIF Orientation 6 ("rotate 90 clockwise to view")."""
    stored = np.rot90(_upright(), k=1)  # counter-clockwise; the viewer turns it back clockwise
    img = Image.fromarray(np.ascontiguousarray(stored))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def test_exif_orientation_is_applied_in_evaluation_search_and_training(tmp_path):
    data = _phone_jpeg()
    assert Image.open(io.BytesIO(data)).size == (64, 48)  # stored landscape
    path = tmp_path / "portrait.jpg"
    path.write_bytes(data)
    for source in (data, path, str(path)):
        pixels, ok = decode_or_blank(source, _identity, 8)
        assert ok and pixels.shape == (64, 48, 3)
        assert np.abs(pixels.numpy().astype(int) - _upright()).mean() < 6  # JPEG noise only
    trained = load_image(data, 16, None).permute(1, 2, 0).numpy().astype(int)  # training's decode: 16 x 16
    assert trained[:6, :, 0].mean() > 200 and trained[:6, :, 2].mean() < 50  # red on top
    assert trained[-6:, :, 2].mean() > 200 and trained[-6:, :, 0].mean() < 50  # blue below
    # a damaged orientation value is ignored, not fatal
    exif = Image.Exif()
    exif[0x0112] = 99
    buf = io.BytesIO()
    Image.fromarray(_upright()).save(buf, format="JPEG", exif=exif.tobytes())
    assert decode_or_blank(buf.getvalue(), _identity, 8)[1]


def test_16_bit_greyscale_png_is_scaled_not_clipped():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 65536, (20, 30)).astype(np.uint16)
    grey[0, :4] = (0, 257, 32768, 65535)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode in ("I;16", "I")  # really 16-bit
    expected = np.rint(grey.astype(np.float64) * 255 / 65535).astype(np.uint8)
    pixels, ok = decode_or_blank(buf.getvalue(), _identity, 8)
    assert ok and pixels.shape == (20, 30, 3)
    for c in range(3):
        assert np.array_equal(pixels[..., c].numpy(), expected)
    assert pixels[0, :4, 0].tolist() == [0, 1, 128, 255]
    assert pixels.float().mean() < 160  # clipping made ~99.6% of it pure white (mean ~254)
    trained = load_image(buf.getvalue(), 30, None)  # training's decode: same scaling (a plain resize of it)
    assert abs(trained.float().mean().item() - expected.mean()) < 3


def test_decode_in_training_is_unchanged_for_ordinary_images():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    ref = Image.fromarray(a).resize((32, 32), Image.BICUBIC, box=(0, 0, 50, 40))
    assert torch.equal(load_image(buf.getvalue(), 32, None), torch.from_numpy(np.asarray(ref).copy()).permute(2, 0, 1))
    assert load_image(buf.getvalue(), 32, random.Random(0)).shape == (3, 32, 32)


def test_a_fifo_is_refused_at_once_not_waited_on(tmp_path):
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    result = []
    t = threading.Thread(target=lambda: result.append(decode_or_blank(fifo, _identity, 8)), daemon=True)
    t.start()
    t.join(20)
    if t.is_alive():  # blocked in open(): unblock it before failing
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        t.join(5)
        pytest.fail("decoding a FIFO blocked waiting for a writer")
    assert result and result[0][1] is False


DEV_ZERO = r"""
import resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # the old code read /dev/zero until this
from flame.data.images import decode_or_blank
for target in sys.argv[1:]:
    t = time.time()
    _, ok = decode_or_blank(target, lambda im: im, 8)
    print(ok, time.time() - t)
print(int(next(x for x in open('/proc/self/status') if x.startswith('VmHWM')).split()[1]))
"""


@pytest.mark.slow
def test_dev_zero_is_refused_without_reading_it(tmp_path):
    link = tmp_path / "zero.jpg"
    link.symlink_to("/dev/zero")  # the same through a symlink in a photo folder
    r = subprocess.run([sys.executable, "-c", DEV_ZERO, "/dev/zero", str(link)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    *runs, maxrss_kb = r.stdout.split("\n")[:-1]
    assert len(runs) == 2
    for line in runs:
        ok, seconds = line.split()
        assert ok == "False" and float(seconds) < 1.0
    assert int(maxrss_kb) < 1_500_000, f"read {int(maxrss_kb) // 1024} MB of /dev/zero"


def test_an_oversized_file_is_not_read(tmp_path, monkeypatch):
    from flame.data import images

    big = tmp_path / "big.png"
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    big.write_bytes(buf.getvalue())
    assert decode_or_blank(big, _identity, 8)[1]
    with pytest.raises(images.UndecodableImage, match="over the limit"):
        images.read_image_file(big, max_bytes=len(buf.getvalue()) - 1)
    with pytest.raises(images.UndecodableImage, match="not a regular file"):
        images.read_image_file(tmp_path)


def test_model_preprocess_of_a_pil_photo_stands_it_up_and_scales_16_bit():
    """`model.preprocess(Image.open(...))` (the Python API) decodes as evaluation does."""
    from flame.model import _to_rgb

    stored = Image.fromarray(np.zeros((48, 64, 3), np.uint8))  # 64 wide, 48 high as stored
    exif = stored.getexif()
    exif[0x0112] = 6  # rotate 90 degrees to view: a phone portrait
    buf = io.BytesIO()
    stored.save(buf, "JPEG", exif=exif)
    buf.seek(0)
    assert _to_rgb(Image.open(buf)).size == (48, 64)
    grey = Image.fromarray(np.full((4, 4), 30000, np.uint16))
    assert np.asarray(_to_rgb(grey))[0, 0].tolist() == [round(30000 * 255 / 65535)] * 3
