"""Reading reference images: any size, mode (RGB, RGBA, grayscale, palette) and EXIF orientation.

Every way a file can be wrong (missing, empty, truncated, not an image, too small) ends in one
:class:`~hyperbooth.errors.ImageLoadError` that names the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from struct import error as struct_error

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from hyperbooth.errors import ImageLoadError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: The most pixels a reference image may have (a 6000 x 6000 photo is 36 M); larger ones are refused from their header,
#: before anything is decoded (a "decompression bomb" claims billions in a few bytes).
MAX_PIXELS = 40_000_000
#: The image formats read (Pillow's names); others (EPS, which runs Ghostscript, PSD, ...) are refused unopened.
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")


def load_image(path: str | os.PathLike, size: int | None = None, min_size: int = 8, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """One image as ``(3, H, W)`` float in [-1, 1]: EXIF-rotated, alpha composited on white, RGB.

    ``size``: centre-crop to a square and resize to ``size`` x ``size`` (antialiased). ``min_size``: the smallest
    side accepted; ``max_pixels``: the most pixels accepted (checked from the header, before decoding).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"{path}: no such image file")
    try:
        with Image.open(path, formats=FORMATS) as im:
            if im.size[0] * im.size[1] > max_pixels:
                raise ImageLoadError(f"{path}: image is {im.size[0]}x{im.size[1]}, more than the {max_pixels:,} pixels accepted")
            im.load()  # decode now: a truncated file fails here, not later
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, rgba)
            im = im.convert("RGB")
    except UnidentifiedImageError:
        raise ImageLoadError(f"{path}: not an image file (or a format Pillow cannot read)") from None
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"{path}: refused as a decompression bomb ({e})") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct_error, IndexError, TypeError, ZeroDivisionError, MemoryError) as e:  # Pillow's decoders fail in many ways on crafted files
        raise ImageLoadError(f"{path}: the image is damaged or truncated ({e})") from None
    if min(im.size) < min_size:
        raise ImageLoadError(f"{path}: image is {im.size[0]}x{im.size[1]}, smaller than the {min_size}x{min_size} the encoder needs")
    if size is not None:
        side = min(im.size)
        left, top = (im.size[0] - side) // 2, (im.size[1] - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC, reducing_gap=3.0)
    array = np.asarray(im, dtype=np.float32)  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def image_files(paths: list[str | os.PathLike]) -> list[Path]:
    """Expand folders into their image files (sorted); a folder with none is an error naming it."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ImageLoadError(f"{p}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        else:
            files.append(p)
    if not files:
        raise ImageLoadError("no reference images given")
    return files
