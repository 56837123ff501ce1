import pytest
import torch

from hyperbooth.errors import ConfigError
from hyperbooth.generate import generate
from hyperbooth.lora import LoRAWeights, apply_lora, target_shapes
from hyperbooth.world.base_model import WorldBaseModel


@pytest.fixture(scope="module")
def base(tiny_world_model):
    return WorldBaseModel.from_pretrained(tiny_world_model)


def _lora(base, n):
    return LoRAWeights.random(target_shapes(base.unet), rank=2, num_subjects=n, std=0.3, generator=torch.Generator().manual_seed(1))


def test_hm_cfg_with_w_pers_zero_is_base_cfg(base):
    prompts = ["a sks toy in the snow", "a sks vase"]
    hm = generate(base, prompts, _lora(base, 2), guidance="hm-cfg", w_base=3.0, w_pers=0.0, steps=3)
    plain = generate(base, prompts, None, guidance_scale=3.0, steps=3)
    torch.testing.assert_close(hm, plain, rtol=1e-4, atol=1e-5)


def test_one_call_branches_equal_separate_calls(base):
    w = _lora(base, 2)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 500])
    states, mask = base.encode(["", "", "a sks toy", "a sks ball", "a sks toy", "a sks ball"])
    unet = base.unet
    with apply_lora(unet, w, rows=[-1, -1, -1, -1, 0, 1]):
        one_call = unet(x.repeat(3, 1, 1, 1), t.repeat(3), encoder_hidden_states=states, encoder_attention_mask=mask).sample
    base_part = unet(x.repeat(2, 1, 1, 1), t.repeat(2), encoder_hidden_states=states[:4], encoder_attention_mask=mask[:4]).sample
    with apply_lora(unet, w):
        pers_part = unet(x, t, encoder_hidden_states=states[4:], encoder_attention_mask=mask[4:]).sample
    torch.testing.assert_close(one_call, torch.cat([base_part, pers_part]), rtol=1e-4, atol=1e-5)


def test_cfg_scale_one_and_lora_effect(base):
    w = _lora(base, 1)
    a = generate(base, ["a sks toy"], w, guidance="cfg", guidance_scale=1.0, steps=2)
    b = generate(base, ["a sks toy"], None, guidance_scale=1.0, steps=2)
    assert (a - b).abs().max() > 1e-3  # the LoRA changes the image
    assert torch.equal(generate(base, ["a sks toy"], w, guidance="cfg", steps=2, seed=5), generate(base, ["a sks toy"], w, guidance="cfg", steps=2, seed=5))


def test_bad_arguments(base):
    with pytest.raises(ConfigError, match="'pag'"):
        generate(base, ["a toy"], guidance="pag")
    with pytest.raises(ConfigError, match="2 subjects"):
        generate(base, ["a toy"], _lora(base, 2))
    with pytest.raises(ConfigError, match="steps"):
        generate(base, ["a toy"], steps=0)
