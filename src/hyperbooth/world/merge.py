"""Joining world tables (``hyperbooth world merge-evals``): the rows of several
:func:`~hyperbooth.world.personalization.evaluate_personalization` results (their ``--json`` files) as one table,
e.g. a sweep run in parts, or a retrained model's rows beside an older run's DreamBooth-LoRA ceiling.

Runs must share the protocol (:data:`MERGE_KEYS`); a label must name one model in every file (the result's
``hypernet_folders``: folder and weights digest, :func:`hypernet_source`); a row label in two files must carry the
same figures. JSON files written before a key existed still merge (a key one file lacks is not compared).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from hyperbooth.errors import ConfigError
from hyperbooth.guidance import DEFAULT_PERS_INTERVAL
from hyperbooth.methods.base import weights_digest
from hyperbooth.world.comparison import DEFAULT_TOLERANCE, compare_hm_cfg

#: Settings that must agree for rows of several evaluation runs to sit in one table (a key one file lacks, e.g. one
#: written before the key existed, is not compared).
MERGE_KEYS: tuple[str, ...] = ("num_identities", "prompts_per_identity", "steps", "seed", "scheduler", "identity_seeds", "batch_size", "base_model", "oracles")
#: Row fields that are settings, not figures: they stay as they are when read back from JSON (figures: null → NaN).
SETTING_FIELDS: tuple[str, ...] = ("label", "kind", "hypernet", "method", "refs", "guidance_scale", "w_base", "w_pers", "pers_interval")
_MISSING = object()


def check_result(source: str, result) -> None:
    """A :class:`ConfigError` naming ``source`` unless ``result`` looks like an eval-personalization result."""
    if not isinstance(result, Mapping) or not isinstance(result.get("settings"), Mapping) or not isinstance(result.get("rows"), list):
        raise ConfigError(f"{source}: not an eval-personalization result (it needs 'settings' and a list of 'rows')")
    for i, row in enumerate(result["rows"]):
        if not isinstance(row, Mapping) or any(k not in row for k in ("label", "kind", "retrieval", "subject", "prompt")):
            raise ConfigError(f"{source}: row {i} is not an eval-personalization row (it needs label, kind, retrieval, subject, prompt); "
                              "files written before retrieval top-1 existed must be measured again")


def hypernet_source(folder: str | os.PathLike) -> str:
    """What a row label stands for in a result's ``hypernet_folders``: the resolved folder and the first 16 hex digits
    of its weights file's SHA-256 (of its config for a method that keeps no weights), so that a checkpoint retrained
    into the same folder counts as another model."""
    folder = Path(folder).resolve()
    return f"{folder} sha256:{weights_digest(folder)}"


def select_hypernets(result: Mapping, labels: Sequence[str], source: str = "result") -> dict:
    """``result`` with only these personalizer labels' rows (and the floor and the references), e.g. to take the
    DreamBooth-LoRA rows of an older run next to a retrained model's; a label the result lacks is refused."""
    check_result(source, result)
    present = {r.get("hypernet") for r in result["rows"]} - {None}
    missing = [label for label in labels if label not in present]
    if not labels or missing:
        raise ConfigError(f"{source}: no row of hypernetwork {(missing or [''])[0]!r} (labels there: {', '.join(sorted(map(str, present)))})")
    settings = dict(result["settings"])
    for key in ("hypernet_folders", "methods"):
        if key in settings:
            settings[key] = {k: v for k, v in (settings[key] or {}).items() if k in labels}
    settings.setdefault("hypernet_folders", {})
    return {**result, "rows": [r for r in result["rows"] if r.get("hypernet") is None or r.get("hypernet") in labels], "settings": settings}


def merge_results(results: Sequence[tuple[str, Mapping]], tolerance: float = DEFAULT_TOLERANCE, keep: Sequence[str] | None = None) -> dict:
    """Rows of several :func:`~hyperbooth.world.personalization.evaluate_personalization` runs (``(source, result)``
    pairs, e.g. read from their ``--json`` files) as one result. The runs must share the protocol
    (:data:`MERGE_KEYS`) and, for a label they share, the personalizer; a row whose label an earlier run already has
    is dropped when its retrieval, subject cosine and prompt fidelity are the same and refused when they differ. ``keep``: only these
    labels' rows (and the floor and the references); a label no file has is refused. The HM-CFG comparison is
    recomputed over the merged rows. Order: references and floor, then each personalizer in order of appearance:
    CFG rows by scale, then HM-CFG rows by w_base (descending), w_pers, timestep interval."""
    if not results:
        raise ConfigError("no evaluation results to merge")
    first_source, first = results[0]
    rows: dict[str, Mapping] = {}
    folders: dict[str, str] = {}
    methods: dict[str, str] = {}
    for source, result in results:
        check_result(source, result)
        for key in MERGE_KEYS:
            mine, theirs = result["settings"].get(key, _MISSING), first["settings"].get(key, _MISSING)
            if mine is not _MISSING and theirs is not _MISSING and mine != theirs:
                raise ConfigError(f"{source}: setting {key!r} differs from {first_source} ({mine!r} vs {theirs!r}); only runs of one protocol can share a table")
        for label, folder in (result["settings"].get("hypernet_folders") or {}).items():
            if folders.setdefault(label, folder) != folder:
                raise ConfigError(
                    f"{source}: label {label!r} names hypernetwork {folder!r} here but {folders[label]!r} in an earlier file "
                    "(another folder, retrained weights, or a file written before labels carried a weights digest); "
                    "label the runs apart or take rows per file with FILE:LABELS"
                )
        for label, method in (result["settings"].get("methods") or {}).items():
            methods.setdefault(label, method)
        for row in result["rows"]:
            row = {k: float("nan") if v is None and k not in SETTING_FIELDS else v for k, v in row.items()}  # JSON null → NaN
            old = rows.get(row["label"])
            if old is None:
                rows[row["label"]] = row
                continue
            differ = [k for k in ("retrieval", "subject", "prompt")
                      if not ((math.isnan(old[k]) and math.isnan(row[k])) or abs(old[k] - row[k]) <= 1e-6)]
            if differ:
                k = differ[0]
                raise ConfigError(f"{source}: row {row['label']!r} has other figures than in an earlier file ({k} {row[k]:.6g} vs "
                                  f"{old[k]:.6g}); label the runs apart")
    kinds = {"references": 0, "floor": 1, "described": 2, "cfg": 3, "hm-cfg": 4}
    models = list(dict.fromkeys(r.get("hypernet") for r in rows.values()))

    def order(r):
        kind = kinds.get(r.get("kind"), 5)
        personalized = kind > 2
        interval = tuple(r.get("pers_interval") or DEFAULT_PERS_INTERVAL)
        return (personalized, models.index(r.get("hypernet")), 0 if personalized else kind, r.get("refs") or 0, kind,
                r.get("guidance_scale") or 0, -(r.get("w_base") or 0), r.get("w_pers") or 0, interval)

    settings = {**first["settings"], "tolerance": tolerance, "hypernet_folders": folders, "merged_from": [src for src, _ in results]}
    if methods:
        settings["methods"] = methods
    merged = {"rows": sorted(rows.values(), key=order), "settings": settings}
    if keep is not None:
        merged = select_hypernets(merged, keep, f"--keep over {', '.join(src for src, _ in results)}")
    return {**merged, "comparison": compare_hm_cfg(merged["rows"], tolerance)}
