"""Full DreamBooth: every UNet weight trains inside the block, and every weight is restored on exit."""

import pytest
import torch

from hyperbooth.backbones.world import WorldBackbone
from hyperbooth.errors import ConfigError
from hyperbooth.generate import generate
from hyperbooth.methods.dreambooth_full import FullFinetuneConfig, full_finetune
from hyperbooth.world.fidelity import reference_images


@pytest.fixture(scope="module")
def base(tiny_world_model):
    return WorldBackbone.from_pretrained(tiny_world_model)


def _state(base):
    return {k: v.clone() for k, v in base.unet.state_dict().items()}


def test_full_finetune_changes_the_unet_inside_and_restores_it(base):
    refs = reference_images(identity_seed=7, k=2)
    before = _state(base)
    image_before = generate(base, ["a sks toy"], None, guidance="cfg", steps=2)
    seen = []
    with full_finetune(base, refs, "toy", FullFinetuneConfig(steps=4, lr=1e-3), callback=seen.append) as stats:
        changed = [k for k, v in base.unet.state_dict().items() if not torch.equal(v, before[k])]
        image_inside = generate(base, ["a sks toy"], None, guidance="cfg", steps=2)
    assert seen == [0, 1, 2, 3, 4] and len(stats.losses) == 4 and stats.seconds > 0
    assert len(changed) > len(before) // 2  # convolutions, norms and attention alike, not a LoRA's few
    assert (image_inside - image_before).abs().max() > 1e-3
    after = _state(base)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any(p.requires_grad for p in base.unet.parameters())
    torch.testing.assert_close(generate(base, ["a sks toy"], None, guidance="cfg", steps=2), image_before)


def test_full_finetune_restores_the_unet_after_an_error(base):
    before = _state(base)
    with pytest.raises(RuntimeError, match="inside"):
        with full_finetune(base, reference_images(identity_seed=7, k=1), "toy", FullFinetuneConfig(steps=1, lr=1e-3)):
            raise RuntimeError("inside")
    assert all(torch.equal(v, before[k]) for k, v in base.unet.state_dict().items())
    with pytest.raises(ConfigError, match="lr="):
        with full_finetune(base, reference_images(identity_seed=7, k=1), "toy", FullFinetuneConfig(lr=-1.0)):
            pass
