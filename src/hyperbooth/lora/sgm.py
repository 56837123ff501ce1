"""Module names of diffusers' ``UNet2DConditionModel`` → those of the original UNet (Stability's SGM / CompVis' LDM
``openaimodel.UNetModel``), which kohya's SDXL LoRAs, A1111 and ComfyUI use.

kohya's sd-scripts trains SD 1.x on diffusers' UNet (its LoRA keys are diffusers' module names with ``.`` → ``_``) but
SDXL on its own port of the SGM UNet, so an SDXL kohya file names modules the SGM way::

    down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q   →  input_blocks.4.1.transformer_blocks.0.attn1.to_q
    mid_block.attentions.0.proj_in                               →  middle_block.1.proj_in
    up_blocks.0.resnets.2.time_emb_proj                          →  output_blocks.2.0.emb_layers.1

The SGM UNet is one flat list per side. ``input_blocks.0`` is ``conv_in``; down level ``i`` with ``n_i`` resnets
takes ``n_i`` entries ``[resnet, (attention)]`` then one ``[downsampler]`` (not after the last level); the middle
block is ``[resnet, attention, resnet]``; up level ``i`` takes ``n_i + 1`` entries ``[resnet, (attention),
(upsampler)]`` (levels in diffusers' order, ``n`` reversed). Inside a resnet the layers have their own names
(:data:`RESNET_NAMES`); inside a transformer they are the same on both sides. The layout (resnets per level, which up
levels attend) comes from the UNet's config: :class:`UNetLayout`. diffusers reads such names back with
``_maybe_map_sgm_blocks_to_diffusers`` (block numbers, from ``layers_per_block``) and ``_convert_unet_lora_key``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

#: resnet layer (diffusers' ``ResnetBlock2D``) → the SGM ``ResBlock``'s
RESNET_NAMES: dict[str, str] = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
#: modules outside the blocks
TOP_NAMES: dict[str, str] = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


@dataclass(frozen=True)
class UNetLayout:
    """What the SGM numbering depends on: resnets per down level, and whether each up level has attentions (its
    upsampler is entry 2 of its last SGM block then, else entry 1)."""

    layers_per_block: tuple[int, ...]
    up_attention: tuple[bool, ...]

    @classmethod
    def from_config(cls, config: Mapping) -> UNetLayout:
        down, up = list(config["down_block_types"]), list(config["up_block_types"])
        per_level = config["layers_per_block"]
        per_level = [int(per_level)] * len(down) if isinstance(per_level, int) else [int(n) for n in per_level]
        return cls(tuple(per_level), tuple("CrossAttn" in t for t in up))

    def to_json(self) -> str:
        return json.dumps({"layers_per_block": list(self.layers_per_block), "up_attention": list(self.up_attention)})

    @classmethod
    def from_json(cls, text: str) -> UNetLayout:
        data = json.loads(text)
        return cls(tuple(int(n) for n in data["layers_per_block"]), tuple(bool(a) for a in data["up_attention"]))


#: SDXL 1.0's UNet (base and refiner-free fine-tunes): two resnets per level, attention in the up levels 0 and 1
SDXL_LAYOUT = UNetLayout((2, 2, 2), (True, True, False))


def _resnet(rest: list[str]) -> list[str] | None:
    if not rest:
        return []
    sub = RESNET_NAMES.get(rest[0])
    return None if sub is None else [*sub.split("."), *rest[1:]]


def to_sgm(name: str, layout: UNetLayout) -> str | None:
    """The SGM name of the diffusers module ``name`` (a block or a layer in it), or ``None`` when the original UNet
    has no such module (e.g. ``time_proj``, which holds no weights)."""
    for diffusers, sgm in TOP_NAMES.items():
        if name == diffusers or name.startswith(diffusers + "."):
            return sgm + name[len(diffusers):]
    parts = name.split(".")
    try:
        if parts[0] == "down_blocks" and len(parts) >= 4:
            level, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            first = 1 + sum(n + 1 for n in layout.layers_per_block[:level])
            if kind == "resnets":
                inner = _resnet(rest)
                return None if inner is None else ".".join(["input_blocks", str(first + j), "0", *inner])
            if kind == "attentions":
                return ".".join(["input_blocks", str(first + j), "1", *rest])
            if kind == "downsamplers" and j == 0:
                tail = ["op", *rest[1:]] if rest and rest[0] == "conv" else rest
                return ".".join(["input_blocks", str(first + layout.layers_per_block[level]), "0", *tail])
        elif parts[0] == "mid_block" and len(parts) >= 3:
            kind, j, rest = parts[1], int(parts[2]), parts[3:]
            if kind == "resnets" and j in (0, 1):
                inner = _resnet(rest)
                return None if inner is None else ".".join(["middle_block", str(2 * j), *inner])
            if kind == "attentions" and j == 0:
                return ".".join(["middle_block", "1", *rest])
        elif parts[0] == "up_blocks" and len(parts) >= 4:
            level, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            up_levels = layout.layers_per_block[::-1]
            first = sum(n + 1 for n in up_levels[:level])
            if kind == "resnets":
                inner = _resnet(rest)
                return None if inner is None else ".".join(["output_blocks", str(first + j), "0", *inner])
            if kind == "attentions":
                return ".".join(["output_blocks", str(first + j), "1", *rest])
            if kind == "upsamplers" and j == 0:
                entry = "2" if layout.up_attention[level] else "1"
                return ".".join(["output_blocks", str(first + up_levels[level]), entry, *rest])
    except (ValueError, IndexError):  # a name outside this layout (another UNet's, a level it lacks)
        return None
    return None
