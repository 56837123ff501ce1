"""Gradient checkpointing of a frozen diffusers UNet whose LoRA is applied by forward hooks.

``unet.enable_gradient_checkpointing()`` keeps only the inputs of each checkpointed block in the forward pass and
recomputes the block during the backward pass (``torch.utils.checkpoint``, non-reentrant): activation memory falls
from every block's intermediates to the blocks' inputs, for one more forward pass of compute.

A method puts its per-sample LoRA into the UNet with forward hooks inside ``backbone.apply_lora(...)`` and computes
its loss there; the engine back-propagates after that context has removed the hooks. With diffusers' checkpoint
function the recomputation would then run without the LoRA — torch stops it ("a different number of tensors was
saved during the original forward and recomputation"). :func:`checkpoint_with_hooks` records the forward hooks of
the block's modules at the forward pass and puts exactly those back while the block is recomputed, so the
recomputed graph is the original one (the gradients equal those without checkpointing; tested).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn
from torch.utils.checkpoint import checkpoint


def checkpoint_with_hooks(block: nn.Module, *args):
    """``torch.utils.checkpoint.checkpoint(block, *args)`` whose recomputation sees the forward hooks the block's
    modules had when it first ran."""
    hooks = [(m, OrderedDict(m._forward_hooks)) for m in block.modules()]

    def run(*inputs):
        current = [(m, m._forward_hooks) for m, _ in hooks]
        for m, saved in hooks:
            m._forward_hooks = OrderedDict(saved)
        try:
            return block(*inputs)
        finally:
            for m, original in current:
                m._forward_hooks = original

    return checkpoint(run, *args, use_reentrant=False)


def enable_gradient_checkpointing(unet: nn.Module) -> None:
    """Checkpoint ``unet``'s blocks (diffusers' ``enable_gradient_checkpointing``) with :func:`checkpoint_with_hooks`."""
    unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_with_hooks)
