"""Reduced-size JPEG decode for the training crop (issue 15, item 9).

libjpeg can decode a JPEG at 1/2, 1/4 or 1/8 of its stored size straight from the DCT
coefficients (PIL's `Image.draft`), at a fraction of the cost of a full decode. The training
crop only needs `size x size` output pixels from its random-resized box, so the decode scale is
chosen per image, from its box (drawn from the stored size, exactly as before, so every sample's
crop and facets are unchanged): the largest scale at which the box still covers at least `size`
decoded pixels on each side. The bicubic resize after it is then still a downscale (or 1:1) of
real pixels, never an upscale: the output keeps the detail it can hold. Small photos (a 500x375
CC3M image at 224 with the default crop scale 0.9-1) get no reduction; a 1600x1200 one is
decoded at 1/4.
"""

from __future__ import annotations

from PIL import Image

SCALES = (8, 4, 2)  # libjpeg's DCT scalings PIL asks for (1: the full decode)
_TRANSPOSING = {5, 6, 7, 8}  # EXIF orientations that swap width and height (ImageOps.exif_transpose)


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) the image has once `exif_transpose` stands it up (read from the header)."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a damaged EXIF block: as_rgb keeps the pixels as stored
        orientation = 1
    return (img.height, img.width) if orientation in _TRANSPOSING else img.size


def draft_scale(width: int, height: int, box: tuple[float, float, float, float], size: int) -> int:
    """The largest s in 8, 4, 2 (else 1) at which the crop `box` (left, top, right, bottom) of a
    width x height image still spans at least `size` pixels on each side of the decoded image,
    whose sides are ceil(width / s) and ceil(height / s) as libjpeg makes them."""
    box_w, box_h = box[2] - box[0], box[3] - box[1]
    for s in SCALES:
        if width < s or height < s:
            continue
        if box_w * (-(-width // s)) / width >= size and box_h * (-(-height // s)) / height >= size:
            return s
    return 1


def request_draft(img: Image.Image, scale: int) -> int:
    """Ask the JPEG decoder for 1/`scale` of the stored size (before any pixel is decoded);
    -> the scale it will use (1: none, e.g. not a baseline single-tile JPEG)."""
    if scale <= 1 or img.format != "JPEG":
        return 1
    stored = img.size
    if img.draft(None, (stored[0] // scale, stored[1] // scale)) is None:
        return 1
    return next((s for s in SCALES if img.size == (-(-stored[0] // s), -(-stored[1] // s))), 1)


def scaled_box(box: tuple[float, float, float, float], full: tuple[int, int],
               decoded: tuple[int, int]) -> tuple[float, float, float, float]:
    """A box in full-size (oriented) coordinates mapped onto the decoded image."""
    fx, fy = decoded[0] / full[0], decoded[1] / full[1]
    return box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy
