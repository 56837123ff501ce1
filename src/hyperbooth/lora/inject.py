"""Applying `LoRAWeights` to a frozen model, per sample, shared, or merged — and restoring it bit-exactly.

For a target module with frozen weight ``W`` and one LoRA per batch row:

    y_n = W x_n + (alpha_n / r_n) · B_n (A_n x_n)

computed for the whole batch with two ``bmm`` calls (no Python loop over rows). Supported modules are
``nn.Linear`` and the 1×1, stride-1 ``nn.Conv2d`` that SD 1.5 uses for ``proj_in``/``proj_out``.

Modes of :meth:`LoRAInjector.apply`:

- ``"per_sample"``: batch row ``i`` uses subject ``rows[i]`` of the LoRA; ``rows[i] = -1`` carries no LoRA
  (the base rows of HM-CFG). Without ``rows``, the batch must be a multiple of N and row ``i`` uses subject
  ``i mod N`` (so a classifier-free-guidance batch ``[uncond; cond]`` personalizes both halves).
- ``"shared"``: one LoRA (N = 1) for every row.
- ``"merged"``: one LoRA folded into ``W`` (``W ← W + ΔW``); on exit the saved ``W`` is copied back, so the
  model is restored bit for bit. Inference only: no gradient reaches the factors.

The other modes add a forward hook per module and remove it on exit; nothing in the model changes. Gradients
flow to ``A``/``B`` (a hypernetwork's output) and to nothing the caller has frozen.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from hyperbooth.errors import ConfigError, LoRAFileError
from hyperbooth.lora.weights import LoRAWeights

#: The SD attention projections (self and cross attention) in diffusers' UNet2DConditionModel.
DEFAULT_UNET_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
#: The attention projections of a CLIP-style text encoder (transformers' CLIPTextModel).
DEFAULT_TEXT_ENCODER_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")

MODES = ("per_sample", "shared", "merged")


def base_module(module: nn.Module) -> nn.Module:
    """The frozen layer itself: a PEFT-wrapped layer (``lora.Linear`` …) keeps it in ``base_layer``."""
    while hasattr(module, "base_layer") and isinstance(module.base_layer, nn.Module):
        module = module.base_layer
    return module


def module_shape(name: str, module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of a LoRA-able module; a clear error for anything else."""
    module = base_module(module)
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Conv2d):
        if module.kernel_size != (1, 1) or module.stride != (1, 1) or module.groups != 1 or module.padding not in ((0, 0), "valid"):
            raise ConfigError(f"module {name!r} is a {module.kernel_size} conv; only 1x1, stride-1, ungrouped Conv2d takes a LoRA")
        return module.in_channels, module.out_channels
    raise ConfigError(f"module {name!r} is a {type(module).__name__}; LoRA targets must be nn.Linear or 1x1 nn.Conv2d")


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def find_targets(model: nn.Module, patterns: Sequence[str] = DEFAULT_UNET_TARGETS) -> dict[str, nn.Module]:
    """Modules of ``model`` whose name equals a pattern or ends with ``"." + pattern`` (``"re:…"`` for a regex).

    Returns name → module in the model's order. Raises if nothing matches or a match cannot take a LoRA.
    """
    found = {name: m for name, m in model.named_modules() if name and any(_matches(name, p) for p in patterns)}
    if not found:
        raise ConfigError(f"no module of {type(model).__name__} matches the LoRA targets {list(patterns)}")
    for name, module in found.items():
        module_shape(name, module)
    return found


def target_shapes(model: nn.Module, patterns: Sequence[str] = DEFAULT_UNET_TARGETS) -> dict[str, tuple[int, int]]:
    """name → ``(d_in, d_out)`` of every target: what a hypernetwork must emit for this model."""
    return {name: module_shape(name, m) for name, m in find_targets(model, patterns).items()}


def check_compatible(model: nn.Module, weights: LoRAWeights, source: str = "LoRA", keys: Mapping[str, str] | None = None) -> dict[str, nn.Module]:
    """Resolve each LoRA module name in ``model`` and check its shape; the error names the first bad key (``keys``:
    module name → the key a file stores it under, named in the error too)."""
    modules = dict(model.named_modules())
    resolved = {}
    for name, layer in weights.items():
        module = modules.get(name)
        what = f"key {keys[name]!r} (module {name!r})" if keys and name in keys else f"module {name!r}"
        if module is None or not name:
            raise LoRAFileError(f"{source}: {what} does not exist in {type(model).__name__}")
        try:
            d_in, d_out = module_shape(name, module)
        except ConfigError as e:
            raise LoRAFileError(f"{source}: {what}: {e}") from None
        if (layer.d_in, layer.d_out) != (d_in, d_out):
            raise LoRAFileError(
                f"{source}: {what} has shape (d_in={d_in}, d_out={d_out}) in the model but "
                f"(d_in={layer.d_in}, d_out={layer.d_out}) in the LoRA"
            )
        resolved[name] = module
    return resolved


def _lora_rows(rows: torch.Tensor | None) -> torch.Tensor | slice | None:
    """The rows that carry a LoRA when not all do: a slice when they are one contiguous block, else their indices;
    ``None`` when every row does. Computed once per :meth:`LoRAInjector.apply` (it reads ``rows`` on the host)."""
    if rows is None:
        return None
    on = (rows >= 0).nonzero().squeeze(1).cpu()
    if on.numel() == rows.numel():
        return None
    first, last = (int(on[0]), int(on[-1])) if on.numel() else (0, -1)
    return slice(first, last + 1) if last + 1 - first == on.numel() else on.to(rows.device)


def _lora_hook(A: torch.Tensor, B: torch.Tensor, rows: torch.Tensor | None, active: torch.Tensor | slice | None, conv: bool,
               enabled: Callable[[], bool] = lambda: True):
    """A forward hook adding ``B (A x)`` per row. ``A (N, r, d_in)``, ``B (N, d_out, r)`` with the scale folded in.

    ``rows``: ``(batch,)`` subject index per row, -1 for none; ``None`` means row ``i`` uses subject ``i mod N``.
    Rows marked -1 (HM-CFG's base rows) are left out of the LoRA matmuls altogether: their output is the module's
    own, at no extra cost; when the LoRA rows are one contiguous block (``[-1, -1, 0]``, ``[-1]*2N + [0..N-1]``) they
    are a slice, with no gather; when sampling (no autograd) their delta is added into the module's output tensor in
    place, so a hook registered earlier that kept that tensor sees the LoRA'd values. ``active``: :func:`_lora_rows`
    of ``rows``, worked out once for all modules.
    ``enabled()`` false: the module's own output (see :meth:`LoRAInjector.disabled`).
    """
    n = A.shape[0]
    if rows is not None:
        picked = rows[active] if active is not None else rows
        A_rows, B_rows = A[picked], B[picked]  # (rows with a LoRA, r, d_in), (…, d_out, r)

    def delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        if conv:  # x: (batch, d_in, H, W)
            return torch.bmm(b, torch.bmm(a, x.flatten(2)))  # (batch, d_out, HW)
        x3 = x.reshape(batch, -1, x.shape[-1])  # (batch, L, d_in)
        return torch.bmm(torch.bmm(x3, a.transpose(1, 2)), b.transpose(1, 2))  # (batch, L, d_out)

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not enabled():
            return output
        x = args[0]
        batch = x.shape[0]
        if rows is None and n == 1:  # one LoRA for every row: plain matmuls, no batch gather
            a, b = A[0], B[0]  # (r, d_in), (d_out, r)
            if conv:  # x: (batch, d_in, H, W)
                return output + torch.matmul(b, torch.matmul(a, x.flatten(2))).view_as(output)
            return output + F.linear(F.linear(x, a), b)
        if rows is not None:
            if batch != rows.shape[0]:
                raise ConfigError(f"per-sample LoRA was given {rows.shape[0]} row indices but the batch has {batch} rows")
            if active is not None:  # only some rows carry a LoRA
                if A_rows.shape[0] == 0:
                    return output
                if isinstance(active, slice):
                    d = delta(x[active], A_rows, B_rows).view_as(output[active])
                    if not torch.is_grad_enabled():  # sampling: add into the block in place, no copy of the rest
                        output[active] += d
                        return output
                    return torch.cat([output[: active.start], output[active] + d, output[active.stop :]])
                d = delta(x.index_select(0, active), A_rows, B_rows)
                return output.index_add(0, active, d.view((-1, *output.shape[1:])))
            a, b = A_rows, B_rows
        elif batch == n:
            a, b = A, B
        elif batch % n == 0:
            a, b = A.repeat(batch // n, 1, 1), B.repeat(batch // n, 1, 1)
        else:
            raise ConfigError(f"per-sample LoRA holds N={n} subjects but the batch has {batch} rows (not a multiple)")
        return output + delta(x, a, b).view_as(output)

    return hook


class LoRAInjector:
    """Applies :class:`LoRAWeights` to a model inside a context that restores it bit-exactly on exit.

    >>> injector = LoRAInjector(unet)
    >>> with injector.apply(weights, mode="per_sample", rows=torch.tensor([-1, -1, 0])):
    ...     eps = unet(x_t, t, cond).sample
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._active = False
        self._mode: str | None = None
        self._enabled = True

    @contextmanager
    def disabled(self) -> Iterator[nn.Module]:
        """Inside, the applied (hooked) LoRA is switched off and the model computes as the base model, for any batch
        size; on exit it is on again. For steps that need only base-model rows (as PEFT's ``disable_adapter()``).
        Merged weights cannot be switched off this way (they are in the weights): an error says so."""
        if self._active and self._mode == "merged":
            raise ConfigError("a merged LoRA cannot be disabled in place; apply it with mode='per_sample' or 'shared'")
        previous, self._enabled = self._enabled, False
        try:
            yield self.model
        finally:
            self._enabled = previous

    @contextmanager
    def apply(
        self,
        weights: LoRAWeights,
        mode: str = "per_sample",
        rows: torch.Tensor | Sequence[int] | None = None,
        scale: float = 1.0,
    ) -> Iterator[nn.Module]:
        if mode not in MODES:
            raise ConfigError(f"unknown LoRA mode {mode!r}; choose one of {', '.join(MODES)}")
        if self._active:
            raise ConfigError("this LoRAInjector is already applied; exit its context before applying again")
        if mode in ("shared", "merged") and weights.num_subjects != 1:
            raise ConfigError(f"LoRA mode {mode!r} takes one subject, got N={weights.num_subjects}; select one or use 'per_sample'")
        if rows is not None and mode != "per_sample":
            raise ConfigError(f"row indices are only meaningful in 'per_sample' mode, not {mode!r}")
        modules = check_compatible(self.model, weights)
        if rows is not None:
            rows = torch.as_tensor(rows, dtype=torch.long, device=weights.device)
            if rows.ndim != 1 or (rows >= weights.num_subjects).any() or (rows < -1).any():
                raise ConfigError(f"row indices must be a 1-D list of subjects in [-1, {weights.num_subjects - 1}], got {rows.tolist()}")
        self._active, self._mode = True, mode
        try:
            if mode == "merged":
                with self._merged(weights, modules, scale):
                    yield self.model
            else:
                with self._hooked(weights, modules, rows, scale):
                    yield self.model
        finally:
            self._active, self._mode = False, None

    @contextmanager
    def _hooked(self, weights, modules, rows, scale):
        handles = []
        active = _lora_rows(rows)  # once, not once per module (it reads the rows on the host: a sync on a GPU)
        try:
            for name, module in modules.items():
                layer = weights[name]
                w = base_module(module).weight
                A = layer.A.to(device=w.device, dtype=w.dtype)
                B = (layer.B * (layer.scale * scale)).to(device=w.device, dtype=w.dtype)
                r = None if rows is None else rows.to(w.device)
                on = active.to(w.device) if isinstance(active, torch.Tensor) else active
                conv = isinstance(base_module(module), nn.Conv2d)
                handles.append(module.register_forward_hook(_lora_hook(A, B, r, on, conv, lambda: self._enabled)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def _merged(self, weights, modules, scale):
        saved: dict[str, torch.Tensor] = {}
        try:
            with torch.no_grad():
                for name, module in modules.items():
                    w = base_module(module).weight
                    saved[name] = w.detach().clone()
                    delta = weights[name].delta()[0] * scale  # (d_out, d_in)
                    w.add_(delta.to(device=w.device, dtype=w.dtype).view_as(w))
            yield
        finally:
            with torch.no_grad():
                for name, original in saved.items():
                    base_module(modules[name]).weight.copy_(original)


@contextmanager
def apply_lora(
    model: nn.Module,
    weights: LoRAWeights,
    mode: str = "per_sample",
    rows: torch.Tensor | Sequence[int] | None = None,
    scale: float = 1.0,
) -> Iterator[nn.Module]:
    """``with apply_lora(unet, weights, mode=...):`` — one-shot form of :meth:`LoRAInjector.apply`."""
    with LoRAInjector(model).apply(weights, mode=mode, rows=rows, scale=scale) as m:
        yield m
