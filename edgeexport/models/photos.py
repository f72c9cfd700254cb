"""Real photographs for image calibration and validation, from packages (no download).

Source photos come from scikit-image's bundled data and scikit-learn's sample images. Random square crops and
flips give many distinct samples. The photos are split by *source*: calibration crops and validation crops never
come from the same photograph.

    python -m edgeexport.models.photos OUT_DIR --set calib|val [--per-photo 16]
    python -m edgeexport.models.photos OUT_DIR --constant 32      # a deliberately broken calibration set
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

CALIB_PHOTOS = ("astronaut", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "logo", "china")
VAL_PHOTOS = ("chelsea", "retina", "motorcycle", "flower")


def _load(name: str) -> np.ndarray:
    try:
        import skimage.data as data
        from sklearn.datasets import load_sample_images
    except ImportError:
        from edgeexport.errors import missing_extra

        raise missing_extra("scikit-image", "vision", "the bundled photos") from None
    if name in ("china", "flower"):
        return load_sample_images().images[0 if name == "china" else 1]
    if name == "motorcycle":
        return data.stereo_motorcycle()[0]
    return getattr(data, name)()[:, :, :3]


def write_photos(out: str | Path, which: str = "calib", per_photo: int = 16, size: int = 256, seed: int = 0) -> Path:
    """Write ``per_photo`` random crops (40-100% of the short side, random flips) of each photo as PNG."""
    from PIL import Image

    names = {"calib": CALIB_PHOTOS, "val": VAL_PHOTOS, "all": CALIB_PHOTOS + VAL_PHOTOS}[which]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + (1 if which == "val" else 0))
    for name in names:
        photo = _load(name)
        h, w = photo.shape[:2]
        for k in range(per_photo):
            side = int(min(h, w) * rng.uniform(0.4, 1.0))
            y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            crop = photo[y : y + side, x : x + side]
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            img = Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.Resampling.BILINEAR)
            img.save(out / f"{name}_{k:02d}.png")
    return out


def write_constant(out: str | Path, count: int = 32, value: int = 128, size: int = 256) -> Path:
    """Uniform gray images: a calibration set that carries no information about real inputs."""
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        Image.new("RGB", (size, size), (value, value, value)).save(out / f"gray_{k:02d}.png")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="write real photo crops (or constant images) as PNG files")
    parser.add_argument("out")
    parser.add_argument("--set", choices=("calib", "val", "all"), default="calib")
    parser.add_argument("--per-photo", type=int, default=16)
    parser.add_argument("--constant", type=int, default=0, help="write N uniform gray images instead")
    args = parser.parse_args(argv)
    if args.constant:
        print(f"wrote {args.constant} constant images to {write_constant(args.out, args.constant)}")
    else:
        out = write_photos(args.out, args.set, args.per_photo)
        print(f"wrote {len(list(out.glob('*.png')))} photo crops ({args.set}) to {out}")


if __name__ == "__main__":
    main()
