"""The question the world table answers: at equal subject fidelity (identity retrieval top-1, the headline), is
HM-CFG's prompt fidelity above personalized CFG's? Each HM-CFG row is matched to the CFG row of the same personalizer
and reference count nearest in retrieval top-1 (:func:`compare_hm_cfg`); the verdict counts matched rows only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from hyperbooth.errors import ConfigError

#: The window of "equal subject fidelity" (retrieval top-1) in which an HM-CFG row and a CFG row are compared.
DEFAULT_TOLERANCE = 0.03


def compare_hm_cfg(rows: Sequence[Mapping], tolerance: float = DEFAULT_TOLERANCE) -> list[dict]:
    """For each HM-CFG row, the personalized-CFG row (same personalizer and reference count) nearest in retrieval
    top-1, and HM-CFG's prompt-fidelity gain over it, overall and on recolour prompts. ``matched``: the retrieval
    figures are within ``tolerance`` (the claim "at equal subject fidelity HM-CFG's prompt fidelity is higher" is
    judged on matched rows only); ``better``: matched and the prompt gain is positive."""
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise ConfigError(f"tolerance={tolerance!r} must be a finite number ≥ 0")
    out = []
    for hm in rows:
        if hm.get("kind") != "hm-cfg":
            continue
        candidates = [r for r in rows if r.get("kind") == "cfg" and r.get("hypernet") == hm.get("hypernet") and r.get("refs") == hm.get("refs") and math.isfinite(r["retrieval"])]
        nearest = min(candidates, key=lambda r: abs(r["retrieval"] - hm["retrieval"]), default=None)
        entry = {"hm_cfg": hm["label"], "cfg": None, "retrieval_gap": float("nan"), "prompt_gain": float("nan"), "recolor_prompt_gain": float("nan"), "matched": False, "better": False}
        if nearest is not None and math.isfinite(hm["retrieval"]):
            gap = hm["retrieval"] - nearest["retrieval"]
            gain = hm["prompt"] - nearest["prompt"]
            matched = abs(gap) <= tolerance + 1e-12
            entry.update(
                cfg=nearest["label"], retrieval_gap=gap, prompt_gain=gain,
                recolor_prompt_gain=hm.get("prompt_recolor", float("nan")) - nearest.get("prompt_recolor", float("nan")),
                matched=matched, better=bool(matched and gain > 0),
            )
        out.append(entry)
    return out
