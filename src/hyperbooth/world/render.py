"""The renderer: (identity, context, pose) → an RGB image, deterministic, in numpy.

Shapes are evaluated analytically on a 4x supersampled pixel grid and box-averaged down, so edges are
anti-aliased and the same arguments give the same bytes on every machine. Image coordinates run over [-1, 1] with
y pointing down; a subject is drawn in its own coordinates (about [-0.5, 0.5]², y down), which the pose maps into
the image (scale, rotation, flip, offset), so patterns, features and the hat move with the subject.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from hyperbooth.errors import ConfigError
from hyperbooth.world.contexts import Context
from hyperbooth.world.identity import Identity, make_identity

RESOLUTIONS = (16, 32, 64, 128)
SUPERSAMPLE = 4
RECOLOR_RGB = {"red": (215, 35, 35), "purple": (135, 45, 180)}
HAT_RGB = (220, 30, 30)
SUBJECT_CENTER_Y = 0.12  # subjects stand a little below the image centre, on the "ground"
SUBJECT_SIZE = 1.1  # image units per subject unit


@dataclass(frozen=True)
class Pose:
    dx: float = 0.0  # offset, image units
    dy: float = 0.0
    scale: float = 1.0
    angle: float = 0.0  # degrees, counter-clockwise
    flip: bool = False


def sample_pose(rng: np.random.Generator) -> Pose:
    """A pose like the spread of DreamBench's photos: small offsets, scale 0.8–1.1, flip, ±12°."""
    return Pose(
        dx=float(rng.uniform(-0.12, 0.12)),
        dy=float(rng.uniform(-0.06, 0.06)),
        scale=float(rng.uniform(0.8, 1.1)),
        angle=float(rng.uniform(-12.0, 12.0)),
        flip=bool(rng.random() < 0.5),
    )


def check_resolution(resolution) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or int(resolution) not in RESOLUTIONS:
        raise ConfigError(f"resolution {resolution!r} is not supported; choose one of {', '.join(map(str, RESOLUTIONS))}")
    return int(resolution)


# -- subjects (subject coordinates; each returns the silhouette mask and the y of its top) --------------------------


def _ball(x, y, p):
    r = 0.36 + 0.1 * p[0]
    squash = 0.85 + 0.15 * p[1]
    mask = x**2 + (y / squash) ** 2 < r**2
    seam = np.abs(y - 0.3 * r * np.sin(3 * x / r + 6 * p[2])) < 0.025
    return mask, mask & seam, -r * squash


def _vase(x, y, p):
    belly, neck, neck_h = 0.24 + 0.12 * p[0], 0.07 + 0.06 * p[1], 0.22 + 0.2 * p[2]
    top, bottom = -0.5, 0.5
    body_top = top + neck_h
    yc, half = (body_top + bottom) / 2, (bottom - body_top) / 2
    body = belly * np.sqrt(np.clip(1 - ((y - yc) / half) ** 2, 0, 1))
    width = np.where(y < body_top, neck, np.maximum(body, neck * (y < yc)))
    width = np.where(y < top + 0.05, neck + 0.04, width)  # rim
    mask = (np.abs(x) < width) & (y > top) & (y < bottom)
    return mask, mask & (np.abs(y - (top + 0.05)) < 0.02), top


def _rounded_rect(x, y, cx, cy, hw, hh, r):
    qx, qy = np.abs(x - cx) - (hw - r), np.abs(y - cy) - (hh - r)
    return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0) < r


def _backpack(x, y, p):
    hw, hh = 0.28 + 0.1 * p[0], 0.36 + 0.08 * p[1]
    body = _rounded_rect(x, y, 0.0, 0.05, hw, hh, 0.12)
    handle_r = 0.09 + 0.05 * p[2]
    ring = np.abs(np.hypot(x, y - (0.05 - hh)) - handle_r) < 0.035
    handle = ring & (y < 0.05 - hh)
    pocket = _rounded_rect(x, y, 0.0, 0.05 + hh * 0.45, hw * 0.65, hh * 0.35, 0.06)
    pocket_edge = pocket & ~_rounded_rect(x, y, 0.0, 0.05 + hh * 0.45, hw * 0.65 - 0.03, hh * 0.35 - 0.03, 0.04)
    return body | handle, pocket_edge | handle, 0.05 - hh - handle_r


def _toy(x, y, p):
    head_r, body_rx, ear_r = 0.18 + 0.05 * p[1], 0.2 + 0.08 * p[0], 0.06 + 0.04 * p[2]
    body = (x / body_rx) ** 2 + ((y - 0.2) / 0.28) ** 2 < 1
    head_y = -0.2
    head = x**2 + (y - head_y) ** 2 < head_r**2
    ears = np.hypot(np.abs(x) - head_r * 0.8, y - (head_y - head_r * 0.8)) < ear_r
    eyes = np.hypot(np.abs(x) - head_r * 0.4, y - head_y + 0.02) < 0.035
    return body | head | ears, eyes, head_y - head_r * 0.8 - ear_r


SUBJECTS: dict[str, Callable] = {"ball": _ball, "vase": _vase, "backpack": _backpack, "toy": _toy}


def _frac(v):
    return v - np.floor(v)


PATTERNS: dict[str, Callable] = {
    "solid": lambda x, y: np.zeros_like(x, dtype=bool),
    "stripes": lambda x, y: _frac(y * 4.5) < 0.4,
    "dots": lambda x, y: np.hypot(_frac(x * 5) - 0.5, _frac(y * 5) - 0.5) < 0.22,
    "checks": lambda x, y: (np.floor(x * 4.5) + np.floor(y * 4.5)) % 2 == 0,
    "zigzag": lambda x, y: _frac(y * 4 + 0.8 * np.abs(_frac(x * 3) - 0.5)) < 0.4,
    "diagonal": lambda x, y: _frac((x + y) * 3.5) < 0.4,
}

FEATURES: dict[str, Callable] = {
    "none": lambda x, y: np.zeros_like(x, dtype=bool),
    "band": lambda x, y: np.abs(y - 0.08) < 0.06,
    "patch": lambda x, y: (np.abs(x - 0.1) < 0.09) & (np.abs(y - 0.12) < 0.09),
    "button": lambda x, y: np.hypot(x, y - 0.05) < 0.08,
}


# -- backgrounds (image coordinates X, Y in [-1, 1], Y down) -------------------------------------------------------


def _rgb(c) -> np.ndarray:
    return np.asarray(c, dtype=np.float32)


def _layers(X, Y, base, *layers) -> np.ndarray:
    img = np.broadcast_to(_rgb(base), X.shape + (3,)).copy()
    for mask, color in layers:
        img[mask] = _rgb(color)
    return img


def _bg_plain(X, Y, rng):
    t = ((Y + 1) / 2)[..., None]
    return _rgb((228, 228, 228)) * (1 - t) + _rgb((185, 185, 192)) * t


def _bg_snow(X, Y, rng):
    mounds = np.zeros_like(X, dtype=bool)
    for _ in range(3):
        cx, r = rng.uniform(-1, 1), rng.uniform(0.3, 0.6)
        mounds |= ((X - cx) / r) ** 2 + ((Y + 0.15) / 0.12) ** 2 < 1
    flakes = (np.hypot(_frac(X * 6 + rng.uniform()) - 0.5, _frac(Y * 6) - 0.5) < 0.08) & (Y < -0.2)
    return _layers(X, Y, (246, 249, 252), (Y < -0.15, (195, 215, 235)), (mounds & (Y > -0.28), (226, 234, 244)), (flakes, (250, 252, 255)))


def _bg_beach(X, Y, rng):
    shore = -0.05 + 0.04 * np.sin(4 * X + rng.uniform(0, 6))
    return _layers(X, Y, (236, 212, 150), (Y < shore, (25, 110, 190)), (np.abs(Y - shore) < 0.03, (240, 248, 250)), (Y < -0.4, (125, 195, 245)))


def _bg_jungle(X, Y, rng):
    img = _layers(X, Y, (18, 80, 30))
    for _ in range(22):
        cx, cy, a = rng.uniform(-1, 1), rng.uniform(-1, 0.6), rng.uniform(0, np.pi)
        u = (X - cx) * np.cos(a) + (Y - cy) * np.sin(a)
        v = -(X - cx) * np.sin(a) + (Y - cy) * np.cos(a)
        img[(u / 0.28) ** 2 + (v / 0.09) ** 2 < 1] = _rgb((45, 150, 55) if rng.random() < 0.6 else (10, 55, 20))
    img[Y > 0.6] = _rgb((70, 50, 25))
    return img


def _bg_wooden_floor(X, Y, rng):
    floor = Y > -0.2
    rows = np.floor((Y + 0.2) / 0.16)
    seam = _frac((Y + 0.2) / 0.16) < 0.12
    joint = _frac(X * 1.2 + 0.5 * (rows % 2) + rng.uniform()) < 0.04
    return _layers(X, Y, (236, 226, 206), (floor, (168, 106, 56)), (floor & (seam | joint), (112, 64, 30)))


def _bg_pink_fabric(X, Y, rng):
    fold = 0.88 + 0.12 * np.sin(3.5 * X + 5 * Y + rng.uniform(0, 6)) * np.sin(2 * Y - X)
    return _rgb((246, 150, 198)) * fold[..., None]


def _bg_city(X, Y, rng):
    img = _layers(X, Y, (72, 72, 78), (Y < 0.3, (196, 204, 218)))
    edges = np.linspace(-1, 1, 9)
    for left, right in zip(edges[:-1], edges[1:]):
        top = rng.uniform(-0.85, -0.25)
        block = (X >= left) & (X < right - 0.02) & (Y > top) & (Y < 0.3)
        img[block] = _rgb((85, 90, 105)) + rng.uniform(0, 40)
        windows = block & (_frac(X * 12) < 0.45) & (_frac(Y * 10) < 0.45) & (Y > top + 0.06)
        img[windows] = _rgb((235, 215, 120))
    return img


def _bg_water(X, Y, rng):
    ripple = np.sin(22 * Y + 3 * np.sin(4 * X + rng.uniform(0, 6))) > 0.75
    return _layers(X, Y, (22, 92, 172), (ripple & (Y > -0.3), (70, 150, 215)), (Y < -0.3, (150, 200, 240)))


def _bg_mountain(X, Y, rng):
    img = _layers(X, Y, (95, 165, 75), (Y < 0.0, (130, 180, 235)))
    for cx in (rng.uniform(-0.9, -0.2), rng.uniform(0.2, 0.9)):
        peak = rng.uniform(-0.8, -0.55)
        height = 0.0 - peak
        inside = (Y > peak + np.abs(X - cx) * 1.1) & (Y < 0.0)
        img[inside] = _rgb((118, 118, 135))
        img[inside & (Y < peak + height * 0.3)] = _rgb((245, 245, 250))
    return img


def _bg_blue_house(X, Y, rng):
    side = 1 if rng.random() < 0.5 else -1
    hx0, hx1 = sorted((side * 0.3, side * 0.95))
    body = (X > hx0) & (X < hx1) & (Y > -0.35) & (Y < 0.1)
    mid, half = (hx0 + hx1) / 2, (hx1 - hx0) / 2 + 0.08
    roof = (Y <= -0.35) & (Y > -0.35 - 0.35 * (1 - np.abs(X - mid) / half))
    door = (np.abs(X - mid) < 0.07) & (Y > -0.1) & (Y < 0.1)
    return _layers(X, Y, (80, 170, 70), (Y < 0.1, (150, 200, 240)), (body, (45, 85, 205)), (roof, (125, 50, 40)), (door, (245, 245, 245)))


def _bg_purple_rug(X, Y, rng):
    img = _layers(X, Y, (60, 90, 45), (Y < 0.2, (28, 95, 45)))
    for _ in range(5):
        cx = rng.uniform(-1, 1)
        img[(np.abs(X - cx) < 0.06) & (Y > -0.35) & (Y < 0.25)] = _rgb((85, 58, 35))
    rug = (X / 0.95) ** 2 + ((Y - 0.55) / 0.32) ** 2 < 1
    img[rug] = _rgb((125, 50, 165))
    return img


def _bg_wheat_field(X, Y, rng):
    stalks = np.sin(40 * X + 4 * Y + rng.uniform(0, 6)) > 0.3
    return _layers(X, Y, (222, 182, 72), (stalks & (Y > -0.25), (185, 140, 42)), (Y < -0.25, (135, 195, 245)))


def _bg_cobblestone(X, Y, rng):
    row = np.floor((Y + 1) / 0.17)
    gap = (_frac((Y + 1) / 0.17) < 0.18) | (_frac(X / 0.22 + 0.5 * (row % 2) + rng.uniform()) < 0.14)
    return _layers(X, Y, (142, 140, 146), (gap, (70, 68, 70)), (Y < -0.35, (175, 165, 150)))


BACKGROUND_RENDERERS: dict[str | None, Callable] = {
    None: _bg_plain,
    "snow": _bg_snow,
    "beach": _bg_beach,
    "jungle": _bg_jungle,
    "wooden_floor": _bg_wooden_floor,
    "pink_fabric": _bg_pink_fabric,
    "city": _bg_city,
    "water": _bg_water,
    "mountain": _bg_mountain,
    "blue_house": _bg_blue_house,
    "purple_rug": _bg_purple_rug,
    "wheat_field": _bg_wheat_field,
    "cobblestone": _bg_cobblestone,
}


# -- composition --------------------------------------------------------------------------------------------------


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    return np.meshgrid(c, c)  # X, Y: (size, size)


def _to_subject(X, Y, pose: Pose):
    """Image coordinates → subject coordinates (the inverse of the pose)."""
    size = SUBJECT_SIZE * pose.scale
    u, v = X - pose.dx, Y - (SUBJECT_CENTER_Y + pose.dy)
    a = np.deg2rad(pose.angle)
    x = (u * np.cos(a) - v * np.sin(a)) / size
    y = (u * np.sin(a) + v * np.cos(a)) / size
    return (-x if pose.flip else x), y


def render_identity(identity: Identity, context: Context = Context(), pose: Pose = Pose(), resolution: int = 32, scene_seed: int = 0) -> np.ndarray:
    """One image ``(H, W, 3)`` uint8 of ``identity`` in ``context`` and ``pose``; ``scene_seed`` varies the backdrop."""
    resolution = check_resolution(resolution)
    X, Y = _grid(resolution * SUPERSAMPLE)
    img = BACKGROUND_RENDERERS[context.background](X, Y, np.random.default_rng([scene_seed, 3])).astype(np.float32)

    x, y = _to_subject(X, Y, pose)
    silhouette, detail, top = SUBJECTS[identity.class_name](x, y, identity.shape)
    primary = RECOLOR_RGB[context.recolor] if context.recolor else identity.primary
    second = PATTERNS[identity.pattern](x, y) | FEATURES[identity.feature](x, y)
    color = np.where(second[..., None], _rgb(identity.secondary), _rgb(primary))
    color = np.where(detail[..., None], color * 0.55, color)
    shade = (1.08 - 0.2 * (y + 0.5)).clip(0.8, 1.1)[..., None]
    img = np.where(silhouette[..., None], color * shade, img)

    if context.accessory == "red_hat":
        brim = (np.abs(x) < 0.22) & (np.abs(y - top) < 0.035)
        cone = (y < top) & (y > top - 0.28) & (np.abs(x) < 0.16 * (y - (top - 0.28)) / 0.28)
        img = np.where((brim | cone)[..., None], _rgb(HAT_RGB), img)
    if context.background == "water":  # floating: the water covers the subject's lower part
        waterline = SUBJECT_CENTER_Y + pose.dy + 0.22 * SUBJECT_SIZE * pose.scale
        under = (silhouette & (Y > waterline))[..., None]
        img = np.where(under, 0.45 * img + 0.55 * _rgb((22, 92, 172)), img)

    img = img.reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render(
    seed: int,
    class_name: str | None = None,
    context: Context = Context(),
    pose: Pose | None = None,
    resolution: int = 32,
    scene_seed: int | None = None,
) -> np.ndarray:
    """Render identity ``seed`` (its own class unless ``class_name``) → ``(H, W, 3)`` uint8."""
    identity = make_identity(seed, class_name)
    return render_identity(identity, context, pose or Pose(), resolution, scene_seed if scene_seed is not None else identity.seed)
