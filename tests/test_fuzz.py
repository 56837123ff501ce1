"""Property-based fuzzing (hypothesis, derandomized and bounded) of the two readers of user files: the LoRA importer and
the image loader. Whatever the bytes, the only exception is hyperbooth's own (LoRAFileError / ImageLoadError, naming
the file), nothing hangs, and a decompression bomb is refused from its header before any pixel is decoded."""

import io
import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from hyperbooth.errors import ImageLoadError, LoRAFileError
from hyperbooth.images import MAX_PIXELS, load_image
from hyperbooth.lora.io import load_lora, save_lora
from hyperbooth.lora.weights import LoRAWeights

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "XX"]
ITEM = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1, "XX": 1}


class _Model(nn.Module):
    """Two attention blocks' projections, the names a LoRA file may target."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"to_q": nn.Linear(8, 8), "to_k": nn.Linear(6, 8)}) for _ in range(2))


MODEL = _Model()
KEY_PARTS = ["blocks.0.to_q", "blocks.1.to_k", "blocks.0.to_v", "lora_unet_blocks_0_to_q", "unet.blocks.1.to_q", "text_encoder.x", "", "é☃"]
SUFFIXES = [".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight", ".alpha", ".weight", ""]


def _safetensors(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@st.composite
def lora_files(draw):
    """A safetensors file with random keys, dtypes, shapes, offsets and metadata — sometimes consistent, often not."""
    header, offset = {}, 0
    for _ in range(draw(st.integers(0, 6))):
        key = draw(st.sampled_from(KEY_PARTS)) + draw(st.sampled_from(SUFFIXES))
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(st.lists(st.integers(0, 9), min_size=0, max_size=3))
        size = int(np.prod(shape)) * ITEM[dtype] if shape else ITEM[dtype]
        if draw(st.booleans()):
            size += draw(st.integers(-3, 3))  # offsets that disagree with the shape
        size = max(size, 0)
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=8), st.one_of(st.text(max_size=8), st.integers()), max_size=3))
    data = draw(st.binary(min_size=offset, max_size=offset)) if draw(st.booleans()) else draw(st.binary(max_size=offset + 8))
    blob = _safetensors(header, data)
    cut = draw(st.one_of(st.none(), st.integers(0, len(blob))))
    return blob if cut is None else blob[:cut]


@FUZZ
@given(blob=lora_files())
def test_lora_importer_raises_only_its_own_error(blob, tmp_path_factory):
    path = tmp_path_factory.mktemp("lora") / "x.safetensors"
    path.write_bytes(blob)
    try:
        loaded = load_lora(path, {"unet": MODEL})
    except LoRAFileError as e:
        assert str(path) in str(e)
    else:  # whatever it accepted fits the model
        for name, layer in loaded.unet.items():
            module = dict(MODEL.named_modules())[name]
            assert layer.A.shape[-1] == module.in_features and layer.B.shape[-2] == module.out_features


@FUZZ
@given(blob=st.binary(max_size=300))
def test_lora_importer_on_random_bytes(blob, tmp_path_factory):
    path = tmp_path_factory.mktemp("lora") / "y.safetensors"
    path.write_bytes(blob)
    with pytest.raises(LoRAFileError, match="y.safetensors"):
        load_lora(path, {"unet": MODEL})


def test_a_valid_file_with_one_flipped_header_byte_is_caught_or_still_valid(tmp_path):
    weights = LoRAWeights.random({"blocks.0.to_q": (8, 8), "blocks.1.to_k": (6, 8)}, rank=2, num_subjects=1)
    good = tmp_path / "good.safetensors"
    save_lora(good, weights, models={"unet": MODEL})
    data = good.read_bytes()
    for i in range(8, min(len(data), 400)):  # every byte of the header, flipped
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(data[:i] + bytes([data[i] ^ 0x20]) + data[i + 1:])
        try:
            load_lora(bad, {"unet": MODEL})
        except LoRAFileError:
            pass


def _png(size=(12, 10), seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg_with_exif(orientation: int) -> bytes:
    im = Image.fromarray(np.random.default_rng(1).integers(0, 255, (10, 14, 3), dtype=np.uint8))
    exif = im.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


@FUZZ
@given(choice=st.sampled_from(["random", "truncated_png", "truncated_jpeg", "flipped_png", "exif"]), n=st.integers(0, 10_000),
       blob=st.binary(max_size=200))
def test_image_loader_raises_only_its_own_error(choice, n, blob, tmp_path_factory):
    if choice == "random":
        data = blob
    elif choice == "truncated_png":
        data = _png()[: n % len(_png())]
    elif choice == "truncated_jpeg":
        full = _jpeg_with_exif(1)
        data = full[: n % len(full)]
    elif choice == "flipped_png":
        full = bytearray(_png())
        full[n % len(full)] ^= 0xFF
        data = bytes(full)
    else:
        data = _jpeg_with_exif(n % 12)  # orientations 0-11: 1-8 are valid, the rest nonsense
    path = tmp_path_factory.mktemp("img") / "x.png"
    path.write_bytes(data)
    try:
        image = load_image(path, size=16)
    except ImageLoadError as e:
        assert str(path) in str(e)
    else:
        assert image.shape == (3, 16, 16) and torch.isfinite(image).all()


@pytest.mark.parametrize("width, height, message", [(100_000, 100_000, "decompression bomb"), (10_000, 5_000, f"more than the {MAX_PIXELS:,} pixels")])
def test_a_decompression_bomb_is_refused_from_its_header(width, height, message, tmp_path):
    """A valid PNG header claiming 10 G pixels (Pillow's own bomb check) or 50 M (hyperbooth's limit): refused from the
    header, before any pixel is decoded."""
    import zlib

    png = bytearray(_png((8, 8)))
    struct.pack_into(">II", png, 16, width, height)  # IHDR width, height
    struct.pack_into(">I", png, 29, zlib.crc32(bytes(png[12:29])))  # the IHDR chunk's CRC, so the header is valid
    path = tmp_path / "bomb.png"
    path.write_bytes(bytes(png))
    with pytest.raises(ImageLoadError, match=message):
        load_image(path)


def test_a_flipped_bit_in_a_written_lora_is_named(tmp_path):
    """safetensors does not checksum its data; hyperbooth's files carry a SHA-256 of their tensors, checked on read."""
    weights = LoRAWeights.random({"blocks.0.to_q": (8, 8), "blocks.1.to_k": (6, 8)}, rank=2, num_subjects=1)
    path = tmp_path / "s.safetensors"
    save_lora(path, weights, "kohya", models={"unet": MODEL})
    assert load_lora(path, {"unet": MODEL}).format == "kohya"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x04  # a bit of the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(LoRAFileError, match="s.safetensors: the tensors do not match the checksum"):
        load_lora(path, {"unet": MODEL})
