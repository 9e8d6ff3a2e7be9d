"""The photographs and flat images the search's information cut is measured on.

Photographs: the corpus files listed in ``data/photos.txt`` (picked by eye), each as stored and
in four harder versions derived here, deterministically, from its displayed pixels: blurred,
low contrast, dark and hazy, the conditions in which a real photograph is smooth. Flat images:
generated one-colour fields, gradients (linear, radial, vignettes) and near-blank scans (a
page's paper colour with sensor noise), each also as a JPEG, whose pHash is rounding noise.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

import asset_library.ingest.fingerprint  # noqa: F401  (registers the HEIF opener, as ingest does)

PHOTO_LIST = Path(__file__).parents[1] / "data" / "photos.txt"

#: Longest side of a derived version: enough for the 32x32 hash grid, cheap to make.
DERIVED_SIDE = 512


def photo_paths() -> list[str]:
    """The listed photographs, as paths under the corpus folder."""
    lines = PHOTO_LIST.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _blurred(rgb: np.ndarray) -> np.ndarray:
    """Out of focus: a Gaussian blur of 1% of the longest side (5 px at 512)."""
    sigma = max(rgb.shape[:2]) / 100
    return cv2.GaussianBlur(rgb, (0, 0), sigma)


def _low_contrast(rgb: np.ndarray) -> np.ndarray:
    """A flat exposure: every pixel pulled to the mean, keeping a quarter of its distance."""
    pixels = rgb.astype(np.float32)
    return np.clip(pixels.mean() + 0.25 * (pixels - pixels.mean()), 0, 255).round().astype(np.uint8)


def _dark(rgb: np.ndarray) -> np.ndarray:
    """Under-exposed by about two stops: a fifth of the light, then the camera's gamma."""
    linear = (rgb.astype(np.float32) / 255) ** 2.2 * 0.2
    return (255 * linear ** (1 / 2.2)).round().astype(np.uint8)


def _hazy(rgb: np.ndarray) -> np.ndarray:
    """Fog or a window's glare: 60% of a light grey veil over the picture."""
    veil = np.float32(225)
    return (0.4 * rgb.astype(np.float32) + 0.6 * veil).round().astype(np.uint8)


#: name -> how a derived version is made from the displayed RGB pixels (uint8, HxWx3)
DEGRADATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "blurred": _blurred,
    "low-contrast": _low_contrast,
    "dark": _dark,
    "hazy": _hazy,
}


def _jpeg(rgb: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(
        ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90]
    )
    assert ok
    return encoded.tobytes()


def _displayed(data: bytes) -> np.ndarray:
    """The picture as shown (EXIF orientation applied), RGB, at most DERIVED_SIDE a side."""
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (DERIVED_SIDE, DERIVED_SIDE))
    image = ImageOps.exif_transpose(image).convert("RGB")
    image.thumbnail((DERIVED_SIDE, DERIVED_SIDE), Image.Resampling.LANCZOS)
    return np.asarray(image)


def photographs(corpus_dir: Path) -> Iterator[tuple[str, bytes]]:
    """(name, JPEG or original bytes) of each listed photograph and its derived versions."""
    for path in photo_paths():
        data = (corpus_dir / path).read_bytes()
        yield path, data
        rgb = _displayed(data)
        for name, degrade in DEGRADATIONS.items():
            yield f"{path} ({name})", _jpeg(degrade(rgb))


def flat_images(seed: int = 17) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of generated flat images, each as PNG and as a JPEG at quality 90."""
    rng = np.random.default_rng(seed)
    h, w = 480, 640
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.hypot((x - w / 2) / (w / 2), (y - h / 2) / (h / 2))
    fields: dict[str, np.ndarray] = {}
    for name, colour in {"black": 0, "white": 255, "grey": 128, "dark grey": 30}.items():
        fields[f"one colour {name}"] = np.full((h, w), colour, np.float32)
    for low, high in ((0, 255), (60, 200), (100, 140)):
        fields[f"horizontal gradient {low}-{high}"] = low + (high - low) * x / (w - 1)
        fields[f"vertical gradient {low}-{high}"] = low + (high - low) * y / (h - 1)
        diagonal = (x / (w - 1) + y / (h - 1)) / 2
        fields[f"diagonal gradient {low}-{high}"] = low + (high - low) * diagonal
        fields[f"radial gradient {low}-{high}"] = high - (high - low) * np.clip(r / 1.42, 0, 1)
    fields["vignette"] = 200 - 120 * np.clip(r - 0.5, 0, 1) ** 2
    for paper in (235, 245):
        for sigma in (2, 6):
            for height, width in ((1650, 1275), (330, 255)):  # a page at 150 dpi, at 30 dpi
                noise = rng.normal(0, sigma, (height, width)).astype(np.float32)
                fields[f"near-blank scan {paper} noise {sigma} {width}px"] = paper + noise
    for name, field in fields.items():
        grey = np.clip(field, 0, 255).round().astype(np.uint8)
        rgb = np.dstack([grey, grey, grey])
        if "gradient" in name:  # a tinted gradient, as wallpapers are
            rgb = np.dstack([grey, (grey * 0.8).astype(np.uint8), np.full_like(grey, 90)])
        png = io.BytesIO()
        Image.fromarray(rgb).save(png, "PNG", compress_level=1)
        yield f"{name} (png)", png.getvalue()
        yield f"{name} (jpeg)", _jpeg(rgb)
