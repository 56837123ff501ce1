"""HyperLoRA on a tiny Stable Diffusion 1.5 pipeline with a tiny CLIP vision encoder: `hyperbooth train` for 2 steps of
each of the three stages (each continuing the last with init_from), then a kohya export that diffusers' own loader
reads and whose UNet output equals hyperbooth's."""

import torch
from diffusers import StableDiffusionPipeline

from hyperbooth import methods
from hyperbooth.backbones import load_backbone
from hyperbooth.lora.io import save_lora
from hyperbooth.methods.hyperlora import HyperLoRA
from hyperbooth.train.engine import load_train_config, train


def test_three_stages_train_and_the_kohya_export_loads_in_diffusers(tiny_sd, tiny_clip, subject_folder, tmp_path):
    common = ["method=hyperlora", "hypernet={rank: 4, num_basis: 6, d_model: 32, depth: 1, heads: 2, id_tokens: 2}", f"hypernet.encoder={tiny_clip}",
              f"base_model={tiny_sd}", "data.kind=dreambench", f"data.path={subject_folder}", "data.num_workers=0", "optim.batch_size=2",
              "optim.warmup_steps=1", "optim.max_steps=2", "log_every=1"]
    folder, states = None, {}
    for stage in (1, 2, 3):
        extra = [f"hypernet.stage={stage}", f"out_dir={tmp_path / f'stage{stage}'}", "data.mode=same"] + ([f"init_from={folder}"] if folder else [])
        folder = train(load_train_config(None, [*common, *extra]))
        states[stage] = methods.load(folder).state_dict()
    for stage in (2, 3):  # what a stage does not train is carried over unchanged; what it trains moves
        trained = set(HyperLoRA.stage_parameters(methods.load(folder), stage))
        for key, value in states[stage].items():
            if key == "stage_reached":
                assert int(value) == stage
            elif key not in trained:
                assert torch.equal(value, states[stage - 1][key]), f"stage {stage} changed {key}"
        assert any(not torch.equal(states[stage][k], states[stage - 1][k]) for k in trained)
    net = methods.load(folder)
    assert type(net) is HyperLoRA and net.config.stage == 3
    backbone = load_backbone(tiny_sd)
    refs = torch.rand(1, 2, 3, backbone.resolution, backbone.resolution) * 2 - 1
    with torch.no_grad():
        coeffs = net.coefficients(refs)
        for basis in (net.id_basis, net.base_basis):  # up-bases moved off zero, as after a longer training
            for up in basis.up:
                up.normal_(std=0.05)
        weights = net.weights(coeffs)
    assert set(weights.ranks.values()) == {4 + 2} and {l.alpha for l in weights.values()} == {3.0}
    path = tmp_path / "subject_kohya.safetensors"
    save_lora(path, weights.select(0), "kohya", models=backbone.components, method=net.method)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # the kohya file's alpha: rank / 2, as the released models'
        assert {float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")} == {3.0}
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.load_lora_weights(str(path))
    x = torch.randn(2, *backbone.sample_shape)
    t = torch.tensor([100, 700])
    cond = backbone.encode_prompts(["a sks toy", "a sks toy in the snow"])
    with torch.no_grad():
        theirs = pipe.unet(x, t, encoder_hidden_states=cond.states).sample
        with backbone.apply_lora(weights, mode="shared"):
            ours = backbone.denoise(x, t, cond)
        plain = backbone.denoise(x, t, cond)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain, ours, atol=1e-5)
