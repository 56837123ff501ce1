"""Image grids and PNG files: captioned grids (generate, demo), plain grids (world samples), atomic writes."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from hyperbooth.errors import ConfigError
from hyperbooth.files import atomic_write_all

UPSCALE = 4  # grid cells: 32x32 images → 128x128, nearest neighbour


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` in [-1, 1] → ``(B, H, W, 3)`` uint8."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def grid(images: list[list[np.ndarray]], upscale: int = 1, pad: int = 1) -> np.ndarray:
    """Rows of equally sized ``(H, W, 3)`` images → one image, nearest-neighbour upscaled, white gutters."""
    h, w, _ = images[0][0].shape
    rows, cols = len(images), max(len(r) for r in images)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(images):
        for j, img in enumerate(row):
            out[pad + i * (h + pad) : pad + i * (h + pad) + h, pad + j * (w + pad) : pad + j * (w + pad) + w] = img
    return out.repeat(upscale, axis=0).repeat(upscale, axis=1)



def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; ``\\n`` starts a new line; over-long words are cut."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width or not line:
                line = candidate
            else:
                lines.append(line)
                line = word
            while font.getlength(line) > width and len(line) > 1:  # a word wider than the cell
                cut = max(i for i in range(1, len(line) + 1) if font.getlength(line[:i]) <= width or i == 1)
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line)
    return lines


def captioned_grid(
    cells: list[list[np.ndarray | None]],
    captions: list[list[str]],
    titles: Sequence[str] | None = None,
    upscale: int = UPSCALE,
    pad: int = 4,
):
    """Rows of ``(H, W, 3)`` uint8 images (``None`` = blank) → one PIL image: each cell upscaled ``upscale``x
    (nearest) with its caption under it, and optional column ``titles`` above; PIL's default font."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    h, w = next(c for row in cells for c in row if c is not None).shape[:2]
    cw, ch = w * upscale, h * upscale
    line_h = font.getbbox("Ag")[3] + 2
    cols = max(len(row) for row in cells)
    title_lines = [_wrap(t, font, cw) if t else [] for t in titles or []]
    title_h = max((len(lines) for lines in title_lines), default=0) * line_h
    caption_lines = [[_wrap(c, font, cw) if c else [] for c in row] for row in captions]
    row_h = [ch + max((len(lines) for lines in row), default=0) * line_h for row in caption_lines]
    canvas = Image.new("RGB", (pad + cols * (cw + pad), pad + title_h + (pad if title_h else 0) + sum(r + pad for r in row_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, lines in enumerate(title_lines):
        draw.multiline_text((pad + j * (cw + pad), pad), "\n".join(lines), fill="black", font=font, spacing=2)
    y = pad + title_h + (pad if title_h else 0)
    for row, lines_row, height in zip(cells, caption_lines, row_h):
        for j, cell in enumerate(row):
            x = pad + j * (cw + pad)
            if cell is not None:
                canvas.paste(Image.fromarray(cell).resize((cw, ch), Image.NEAREST), (x, y))
            if j < len(lines_row) and lines_row[j]:
                draw.multiline_text((x, y + ch + 1), "\n".join(lines_row[j]), fill="black", font=font, spacing=2)
        y += height + pad
    return canvas


def save_png(image, path: str | os.PathLike) -> Path:
    """Write a PIL image (or ``(H, W, 3)`` uint8 array) as PNG, atomically."""
    write_pngs([(Path(path), image)])
    return Path(path)


def write_pngs(files: Sequence[tuple[Path, object]], folder: Path | None = None) -> None:
    """Write ``(path, image)`` PNGs (PIL images or ``(H, W, 3)`` uint8 arrays) all or none
    (:func:`atomic_write_all`); ``folder``, made if missing, is removed again when the writes fail."""
    from PIL import Image

    def writer(image):
        image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
        return lambda tmp: image.save(tmp, format="PNG")

    if not files:
        return
    made = folder is not None and not folder.is_dir()
    try:
        if made:
            folder.mkdir()
        atomic_write_all([(path, writer(image)) for path, image in files])
    except BaseException as e:
        if made and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        if isinstance(e, OSError) and e.errno is not None:  # the file system's refusal (full, read-only, ...), not a bug
            raise ConfigError(f"cannot write the images into {str(folder or files[0][0].parent)!r}: {e.strerror or e}") from None
        raise
