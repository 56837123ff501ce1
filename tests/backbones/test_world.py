"""The world's pixel-space model behind the Backbone interface."""

import pytest
import torch

from hyperbooth.backbones import Conditioning, WorldBackbone, load_backbone
from hyperbooth.errors import ConfigError
from hyperbooth.generate import generate
from hyperbooth.lora import LoRAWeights


@pytest.fixture(scope="module")
def world(tiny_world_model) -> WorldBackbone:
    return load_backbone(tiny_world_model)


def test_pixel_space_and_conditioning(world):
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(world.to_model(images), images) and torch.equal(world.to_images(images), images)
    assert world.sample_shape == (3, 32, 32) and world.spatial_factor == 1 and set(world.components) == {"unet"}
    cond = world.encode_prompts(["a sks toy", ""])
    assert cond.states.shape[:2] == cond.mask.shape and cond.states.shape[-1] == 384 and cond.mask.dtype == torch.bool
    assert cond.mask[0].sum() > cond.mask[1].sum()  # the empty prompt has fewer real tokens
    both = Conditioning.cat([cond, cond.take(1)])
    assert len(both) == 3 and torch.equal(both.select([2]).states, cond.states[:1])


def test_no_text_encoder_lora_and_no_unknown_component(world):
    lora = LoRAWeights.random(world.target_shapes(), rank=1, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="text encoder is frozen"):
        world.encode_prompts(["a toy"], lora=lora)
    with pytest.raises(ConfigError, match="world backbone has no component 'text_encoder'"):
        generate(world, ["a toy"], {"unet": lora, "text_encoder": lora}, steps=1)
    with pytest.raises(ConfigError, match="no component 'text_encoder'"):
        with world.apply_lora({"text_encoder": lora}):
            pass


def test_apply_lora_restores_the_unet(world):
    before = {k: v.clone() for k, v in world.unet.state_dict().items()}
    lora = LoRAWeights.random(world.target_shapes(), rank=2, std=0.3, generator=torch.Generator().manual_seed(0))
    x, t = torch.randn(1, *world.sample_shape), torch.tensor([300])
    cond = world.encode_prompts(["a sks toy"])
    with torch.no_grad():
        plain = world.denoise(x, t, cond)
        with world.apply_lora(lora, mode="merged"):
            assert (world.denoise(x, t, cond) - plain).abs().max() > 1e-3
        assert torch.equal(world.denoise(x, t, cond), plain)
    assert all(torch.equal(before[k], v) for k, v in world.unet.state_dict().items())
