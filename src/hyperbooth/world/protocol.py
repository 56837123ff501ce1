"""The protocol of the world's personalization table (``hyperbooth world eval-personalization``): what is generated
and under which settings.

Held-out identities (``identity_seeds("test", n)``), each with ``k`` references from
:func:`~hyperbooth.world.fidelity.reference_images` and a fixed set of evaluation contexts over every context type
(:func:`personalization_items`). Every row generates the same (identity, context) list with the same initial noise,
so rows differ only by the method: ``floor`` (base model, class prompt, CFG), ``described`` (base model, the
class prompt with the identity described in words — "a yellow ball with navy dots …" —, CFG: what a user gets by
describing the subject instead of showing it), ``cfg`` (personalized model, rare-token prompt, CFG) and ``hm-cfg``
(Hybrid-Model CFG with ``w_base``, ``w_pers``) (:class:`RowSpec`, :func:`personalization_rows`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from hyperbooth.errors import ConfigError
from hyperbooth.guidance import DEFAULT_GUIDANCE_SCALE, DEFAULT_PERS_INTERVAL, DEFAULT_W_BASE, DEFAULT_W_PERS, check_interval
from hyperbooth.world import contexts as ctx
from hyperbooth.world.identity import describe, identity_class, make_identity

#: Context kinds of an identity's evaluation prompts, in order; prompt ``j`` of an identity has kind ``j mod 8``.
PERSONALIZATION_KINDS: tuple[str, ...] = (
    "plain",
    "background",
    "recolor",
    "accessory",
    "recolor+background",
    "accessory+background",
    "recolor+accessory+background",
    "background",
)
#: The row kinds: the base model (``floor``), the base model told the subject in words (``described``), the
#: personalized model with CFG, with HM-CFG.
ROW_KINDS: tuple[str, ...] = ("floor", "described", "cfg", "hm-cfg")
#: The row kinds that sample the base model alone (no personalizer).
BASE_KINDS: tuple[str, ...] = ("floor", "described")


@dataclass(frozen=True)
class EvalItem:
    """One generation of the protocol: subject ``subject`` (its index among the identities) in ``context``."""

    subject: int
    identity_seed: int
    class_name: str
    context: ctx.Context

    def prompt(self, token: str | None, described: bool = False) -> str:
        """Its prompt, with the rare ``token`` before the class noun; ``described``: the identity's colours, pattern
        and feature in words (:func:`~hyperbooth.world.identity.describe`)."""
        color, details = describe(make_identity(self.identity_seed, self.class_name)) if described else ("", "")
        return ctx.prompt_for(self.class_name, self.context, token=token, color=color, details=details)

    @property
    def types(self) -> tuple[str, ...]:
        """The context types of its prompt (:data:`~hyperbooth.world.contexts.CONTEXT_TYPES`)."""
        return self.context.types


def personalization_items(seeds: Sequence[int], prompts_per_identity: int = 6) -> list[EvalItem]:
    """The evaluation contexts, identity-major: identity ``i`` gets kinds ``PERSONALIZATION_KINDS[:prompts_per_identity]``
    (cycled); backgrounds and recolours are dealt in turn across all identities, so with 6 prompts every background
    occurs within 4 identities and every identity is shown both red and purple. Deterministic."""
    if prompts_per_identity < 1:
        raise ConfigError(f"prompts_per_identity={prompts_per_identity} must be at least 1")
    deal = {"background": list(ctx.BACKGROUNDS), "recolor": list(ctx.RECOLOR_WORDS), "accessory": list(ctx.ACCESSORY_PHRASES)}
    dealt = dict.fromkeys(deal, 0)
    items = []
    for i, seed in enumerate(seeds):
        class_name = identity_class(seed)
        for j in range(prompts_per_identity):
            fields = {}
            for part in PERSONALIZATION_KINDS[j % len(PERSONALIZATION_KINDS)].split("+"):
                if part in deal:
                    fields[part] = deal[part][dealt[part] % len(deal[part])]
                    dealt[part] += 1
            items.append(EvalItem(i, int(seed), class_name, ctx.Context(**fields)))
    return items


def check_weight(value, name: str) -> float:
    """A guidance weight: a finite number ≥ 0; the error names it."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} is not a number") from None
    if not math.isfinite(v) or v < 0:
        raise ConfigError(f"{name}={value!r} must be a finite number ≥ 0")
    return v


def check_positive(value, name: str) -> int:
    """An integer of at least 1; the error names it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} must be an integer of at least 1")
    return value


def interval_tag(interval) -> str:
    """`` t/T in [lo,hi]`` for an HM-CFG timestep interval other than every step (ASCII: any font draws it)."""
    interval = tuple(float(v) for v in interval)
    return "" if interval == DEFAULT_PERS_INTERVAL else " t/T in [{:g},{:g}]".format(*interval)


@dataclass(frozen=True)
class RowSpec:
    """One row of the table: a sampling method and its settings.

    ``kind``: ``"floor"`` (base model, CFG), ``"described"`` (base model, the subject described in words, CFG),
    ``"cfg"`` (personalized model, CFG) or ``"hm-cfg"`` (with ``w_base``,
    ``w_pers`` and the timestep interval ``pers_interval``, see :func:`hyperbooth.guidance.pers_active`).
    ``hypernet``: the label of the personalizer (any method) of a personalized row; ``refs``: its reference images
    per subject. ``class_prompt``: prompt with the class noun only (``"a toy …"``) instead of the rare-token form
    (``"a sks toy …"``); by default the floor does, the personalized rows do not.
    """

    kind: str
    hypernet: str | None = None
    refs: int = 1
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    w_base: float = DEFAULT_W_BASE
    w_pers: float = DEFAULT_W_PERS
    pers_interval: tuple[float, float] = DEFAULT_PERS_INTERVAL
    class_prompt: bool | None = None

    def __post_init__(self) -> None:
        if self.kind not in ROW_KINDS:
            raise ConfigError(f"unknown row kind {self.kind!r}; choose one of {', '.join(ROW_KINDS)}")
        if self.kind not in BASE_KINDS and not self.hypernet:
            raise ConfigError(f"a {self.kind!r} row needs the label of a personalizer")
        if isinstance(self.refs, bool) or not isinstance(self.refs, int) or self.refs < 1:
            raise ConfigError(f"refs={self.refs!r} must be an integer of at least 1")
        for name in ("guidance_scale", "w_base", "w_pers"):
            check_weight(getattr(self, name), name)
        object.__setattr__(self, "pers_interval", check_interval(self.pers_interval))  # frozen: normalise to floats

    @property
    def personalized(self) -> bool:
        return self.kind not in BASE_KINDS

    @property
    def described(self) -> bool:
        return self.kind == "described"

    @property
    def token(self) -> str | None:
        uses_class_prompt = not self.personalized if self.class_prompt is None else self.class_prompt
        return None if uses_class_prompt else ctx.RARE_TOKEN

    @property
    def label(self) -> str:
        if self.kind == "floor":
            text = f"floor cfg g={self.guidance_scale:g}"
        elif self.kind == "described":
            text = f"described in words cfg g={self.guidance_scale:g}"
        else:
            name = self.hypernet + (f" k={self.refs}" if self.refs != 1 else "")
            text = f"{name} cfg g={self.guidance_scale:g}" if self.kind == "cfg" else f"{name} hm-cfg w_base={self.w_base:g} w_pers={self.w_pers:g}"
            if self.kind == "hm-cfg":
                text += interval_tag(self.pers_interval)
        if self.class_prompt is not None and (self.token is None) != (not self.personalized):
            text += " (class prompt)" if self.token is None else f" ({ctx.RARE_TOKEN} prompt)"
        return text


#: The grid of ``hyperbooth world eval-personalization --sweep`` (the README's HM-CFG sweep).
SWEEP_GUIDANCE_SCALES: tuple[float, ...] = (2.0, 3.0, 4.0)
SWEEP_W_BASE: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0)
SWEEP_W_PERS: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)


def hm_cfg_pairs(w_base: Sequence[float], w_pers: Sequence[float], sweep: bool = False) -> list[tuple[float, float]]:
    """``(w_base, w_pers)`` pairs: every combination (``sweep``), else element by element (a single value pairs
    with every value of the other list)."""
    w_base = [check_weight(v, "w_base") for v in w_base]
    w_pers = [check_weight(v, "w_pers") for v in w_pers]
    if not w_base or not w_pers:
        raise ConfigError(f"w_base={w_base} and w_pers={w_pers} must both name at least one weight")
    if sweep:
        return list(itertools.product(w_base, w_pers))
    if len(w_base) == 1 or len(w_pers) == 1:
        return [(b, p) for b in w_base for p in w_pers]
    if len(w_base) != len(w_pers):
        raise ConfigError(f"w_base={w_base} and w_pers={w_pers} differ in length; give equally long lists, one value, or sweep the grid")
    return list(zip(w_base, w_pers))


def personalization_rows(
    hypernets: Sequence[str],
    refs: Sequence[int] = (1,),
    guidance_scales: Sequence[float] = (DEFAULT_GUIDANCE_SCALE,),
    hm_pairs: Sequence[tuple[float, float]] = ((DEFAULT_W_BASE, DEFAULT_W_PERS),),
    pers_intervals: Sequence[tuple[float, float]] = (DEFAULT_PERS_INTERVAL,),
    described: bool = False,
) -> list[RowSpec]:
    """The rows of the table: the floor at each guidance scale (and, with ``described``, the base model told each
    subject in words at each scale), then for each personalizer label and reference count its CFG rows (each
    guidance scale) and HM-CFG rows (each ``(w_base, w_pers)`` pair at each timestep interval)."""
    if not guidance_scales:
        raise ConfigError("guidance_scales must name at least one scale")
    if not refs:
        raise ConfigError("refs must name at least one reference count")
    rows = [RowSpec("floor", guidance_scale=g) for g in guidance_scales]
    if described:
        rows += [RowSpec("described", guidance_scale=g) for g in guidance_scales]
    for label in hypernets:
        for k in refs:
            rows += [RowSpec("cfg", label, k, guidance_scale=g) for g in guidance_scales]
            rows += [RowSpec("hm-cfg", label, k, w_base=b, w_pers=p, pers_interval=iv) for b, p in hm_pairs for iv in pers_intervals]
    return rows
