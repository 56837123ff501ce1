from pathlib import Path

import pytest
import torch
from PIL import Image

from hyperbooth.errors import ImageLoadError
from hyperbooth.images import image_files, load_image

DREAMBENCH = Path(__file__).resolve().parents[1].parent / "shared" / "dreambench" / "dataset"


@pytest.mark.skipif(not DREAMBENCH.is_dir(), reason="../shared/dreambench is not beside the checkout")
def test_real_dreambench_photo():
    x = load_image(DREAMBENCH / "backpack" / "00.jpg", size=32)
    assert x.shape == (3, 32, 32) and -1 <= x.min() and x.max() <= 1 and x.std() > 0.05


@pytest.mark.skipif(not DREAMBENCH.is_dir(), reason="../shared/dreambench is not beside the checkout")
def test_truncated_real_jpeg(tmp_path):
    data = (DREAMBENCH / "dog" / "00.jpg").read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageLoadError, match="cut.jpg.*damaged or truncated"):
        load_image(cut)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "LA", "I;16"])
def test_modes(tmp_path, mode):
    path = tmp_path / f"img_{mode.replace(';', '')}.png"
    Image.new("RGB", (40, 30), (250, 10, 10)).convert(mode).save(path)
    x = load_image(path, size=16)
    assert x.shape == (3, 16, 16)


def test_transparent_pixels_become_white(tmp_path):
    path = tmp_path / "clear.png"
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(path)
    assert torch.allclose(load_image(path), torch.ones(3, 20, 20))


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 20, 20))  # white left half
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    path = tmp_path / "rot.jpg"
    im.save(path, exif=exif)
    x = load_image(path)
    assert x.shape == (3, 40, 20)  # portrait after applying EXIF
    assert x[:, :20].mean() > 0.5 > x[:, 20:].mean()  # the white half is now on top


def test_bad_files_are_named(tmp_path):
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(ImageLoadError, match="notes.png.*not an image"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(ImageLoadError, match="missing.png.*no such"):
        load_image(tmp_path / "missing.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "tiny.png")
    with pytest.raises(ImageLoadError, match="tiny.png.*4x4"):
        load_image(tmp_path / "tiny.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageLoadError, match="empty.*no images"):
        image_files([tmp_path / "empty"])
