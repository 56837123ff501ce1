"""The world table's outputs: the rows as a Markdown table (:func:`personalization_table`), the HM-CFG vs CFG
comparison with its verdict (:func:`comparison_table`), JSON-safe figures (:func:`to_json`) and the subject vs
prompt fidelity plot (:func:`plot_fidelity`, drawn with PIL).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

from hyperbooth.errors import ConfigError
from hyperbooth.files import atomic_write
from hyperbooth.guidance import DEFAULT_PERS_INTERVAL
from hyperbooth.world.comparison import DEFAULT_TOLERANCE
from hyperbooth.world.fidelity import RETRIEVAL_CANDIDATES
from hyperbooth.world.oracles import ATTRIBUTE_CHANCE
from hyperbooth.world.protocol import ROW_KINDS, interval_tag


def _fmt(value, digits: int = 3, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


#: The chance level of each paired subject figure: retrieval top-1 among 8, the pairwise AUC, attribute recovery.
CHANCE = {"retrieval": 1 / RETRIEVAL_CANDIDATES, "auc": 0.5, "retrieval_same_color": 1 / RETRIEVAL_CANDIDATES, **{f"attr_{k}": v for k, v in ATTRIBUTE_CHANCE.items()}}


def personalization_table(result: Mapping) -> str:
    """The rows as a Markdown table: retrieval top-1 among 8 first (the headline), the pairwise AUC, attribute
    recovery, the raw cosine beside them, prompt fidelity; a last row gives each subject figure's chance level."""
    columns = (
        ("method", "label", None), ("retrieval top-1 of 8", "retrieval", 3), ("± sem", "retrieval_sem", 3), ("AUC", "auc", 3),
        ("retrieval · same colour", "retrieval_same_color", 3), ("primary colour", "attr_primary", 3), ("secondary colour", "attr_secondary", 3), ("pattern", "attr_pattern", 3),
        ("shape", "attr_shape", 3), ("cosine", "subject", 3), ("prompt", "prompt", 3),
        ("background", "prompt_background", 3), ("recolour", "prompt_recolor", 3), ("hat", "prompt_accessory", 3),
        ("class", "prompt_class", 3), ("retrieval · recolour prompts", "retrieval_recolor", 3),
        ("s / image", "seconds_per_image", 3), ("personalize ms / subject", "hypernet_ms_per_subject", 1),
    )
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "|".join("---" if c[2] is None else "---:" for c in columns) + "|"]
    for row in result["rows"]:
        lines.append("| " + " | ".join(str(row[key]) if digits is None else _fmt(row.get(key), digits) for _, key, digits in columns) + " |")
    lines.append("| " + " | ".join("*chance*" if key == "label" else _fmt(CHANCE.get(key), digits) for _, key, digits in columns) + " |")
    return "\n".join(lines)


def comparison_table(comparison: Sequence[Mapping], tolerance: float = DEFAULT_TOLERANCE) -> str:
    """:func:`compare_hm_cfg`'s answer as Markdown, with a one-line verdict."""
    if not comparison:
        return "(no HM-CFG rows to compare)"
    lines = [
        f"| HM-CFG | nearest personalized CFG | Δ retrieval top-1 | Δ prompt | Δ prompt · recolour | within {tolerance:g} |",
        "|---|---|---:|---:|---:|:---:|",
    ]
    for c in comparison:
        lines.append(f"| {c['hm_cfg']} | {c['cfg'] or '–'} | {_fmt(c['retrieval_gap'], signed=True)} | {_fmt(c['prompt_gain'], signed=True)} | {_fmt(c['recolor_prompt_gain'], signed=True)} | {'yes' if c['matched'] else 'no'} |")
    matched = [c for c in comparison if c["matched"]]
    better = sum(c["better"] for c in matched)
    recolor_better = sum(c["recolor_prompt_gain"] > 0 for c in matched)
    lines.append("")
    lines.append(
        f"At equal retrieval top-1 (within {tolerance:g}): HM-CFG's prompt fidelity is above personalized CFG's in "
        f"{better} of {len(matched)} matched HM-CFG rows ({recolor_better} of {len(matched)} on recolour prompts); "
        f"{len(comparison) - len(matched)} of {len(comparison)} HM-CFG rows had no CFG row that close."
    )
    return "\n".join(lines)


def to_json(value):
    """Figures → JSON-safe values (NaN and infinities → null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


_PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194), (23, 190, 207))


def plot_fidelity(rows: Sequence[Mapping], path, size: tuple[int, int] = (720, 540)):
    """Subject fidelity (retrieval top-1 among 8, x) vs prompt fidelity (y), drawn with PIL and written as PNG: one line per series (the
    floor and each personalized CFG over guidance scales; HM-CFG over ``w_pers`` at each ``w_base``), points
    labelled by their setting, the references' subject fidelity as a dashed vertical line."""
    points = [r for r in rows if r.get("kind") in ROW_KINDS and math.isfinite(r["retrieval"]) and math.isfinite(r["prompt"])]
    if not points:
        raise ConfigError("no row has finite retrieval top-1 and prompt fidelity to plot")
    series: dict[str, list] = {}
    for r in points:
        model = f"{r.get('hypernet')}" + (f" k={r['refs']}" if r.get("refs", 1) != 1 else "")
        if r["kind"] == "floor":
            name, order, tag = "floor (base, CFG)", r["guidance_scale"], f"g={r['guidance_scale']:g}"
        elif r["kind"] == "described":
            name, order, tag = "described in words (base, CFG)", r["guidance_scale"], f"g={r['guidance_scale']:g}"
        elif r["kind"] == "cfg":
            name, order, tag = f"{model} CFG", r["guidance_scale"], f"g={r['guidance_scale']:g}"
        else:
            when = interval_tag(r.get("pers_interval") or DEFAULT_PERS_INTERVAL)
            name, order, tag = f"{model} HM-CFG w_base={r['w_base']:g}{when}", r["w_pers"], f"{r['w_base']:g}/{r['w_pers']:g}"
        series.setdefault(name, []).append((order, r["retrieval"], r["prompt"], tag))
    refs = [r["retrieval"] for r in rows if r.get("kind") == "references" and math.isfinite(r["retrieval"])]
    xs = [p[1] for s in series.values() for p in s]
    ys = [p[2] for s in series.values() for p in s]
    x0, x1 = min(xs), max(xs)
    off_axis = [x for x in refs if x > x1 + max(0.3, x1 - x0)]  # far to the right: named, not drawn to scale
    refs = [x for x in refs if x not in off_axis]
    xs += refs
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    pad_x, pad_y = max(0.02, 0.08 * (x1 - x0)), max(0.02, 0.08 * (y1 - y0))
    x0, x1, y0, y1 = x0 - pad_x, x1 + pad_x, y0 - pad_y, y1 + pad_y

    w, h = size
    left, right, top, bottom = 60, 20, 20 + 12 * len(series), 45
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()

    def px(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * (w - left - right), h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(6):  # ticks
        tx, ty = x0 + (x1 - x0) * i / 5, y0 + (y1 - y0) * i / 5
        gx, _ = px(tx, y0)
        _, gy = px(x0, ty)
        draw.line([gx, h - bottom, gx, h - bottom + 4], fill="black")
        draw.text((gx - 12, h - bottom + 6), f"{tx:.2f}", fill="black", font=font)
        draw.line([left - 4, gy, left, gy], fill="black")
        draw.text((left - 34, gy - 5), f"{ty:.2f}", fill="black", font=font)
    draw.text(((w - 120) / 2, h - 18), "subject fidelity: retrieval top-1 of 8", fill="black", font=font)
    draw.text((w - right - 250, h - 18), "points: g = CFG scale, a/b = w_base/w_pers", fill=(120, 120, 120), font=font)
    draw.text((4, 4), "prompt fidelity", fill="black", font=font)
    for i, x in enumerate(off_axis):
        draw.text((w - right - 190, top + 4 + 12 * i), f"references: {x:.3f} (off the axis) ->", fill=(120, 120, 120), font=font)
    for x in refs:
        gx, _ = px(x, y0)
        for y in range(top, h - bottom, 8):
            draw.line([gx, y, gx, min(y + 4, h - bottom)], fill=(120, 120, 120))
        draw.text((gx + 3 if gx < w - right - 70 else gx - 63, top + 2), "references", fill=(120, 120, 120), font=font)
    for i, (name, pts) in enumerate(series.items()):
        color = (110, 110, 110) if name.startswith("floor") else _PALETTE[i % len(_PALETTE)]
        pts = sorted(pts)
        coords = [px(p[1], p[2]) for p in pts]
        if len(coords) > 1:
            draw.line(coords, fill=color, width=2)
        for (cx, cy), p in zip(coords, pts):
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=color)
            draw.text((cx + 4, cy - 11), p[3], fill=color, font=font)
        draw.rectangle([left + 110, 4 + 12 * i + 3, left + 116, 4 + 12 * i + 9], fill=color)
        draw.text((left + 120, 4 + 12 * i), name, fill="black", font=font)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
