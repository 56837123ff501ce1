"""HyperDreamBooth on a tiny Stable Diffusion 1.5 pipeline with a tiny CLIP vision encoder: `hyperbooth train` for 2
steps from DreamBench-layout photos (diffusion loss only: no pre-optimized targets for photos), then personalize with
the rank-relaxed fast fine-tune, and the LoRA file read back by diffusers' own loader."""

import torch
from diffusers import StableDiffusionPipeline

from hyperbooth import methods
from hyperbooth.backbones import load_backbone
from hyperbooth.lora.io import save_lora
from hyperbooth.methods.hyperdreambooth import HyperDreamBooth
from hyperbooth.train.engine import load_train_config, train


def test_trains_two_steps_and_personalizes_on_sd15(tiny_sd, tiny_clip, subject_folder, tmp_path):
    args = ["method=hyperdreambooth", "hypernet={rank: 1, a: 16, b: 8, d_model: 32, layers: 1, heads: 2, iterations: 2, weight_loss: 0}",
            f"hypernet.encoder={tiny_clip}", f"base_model={tiny_sd}", "data.kind=dreambench", f"data.path={subject_folder}", "data.num_workers=0",
            "optim.batch_size=2", "optim.warmup_steps=1", "optim.max_steps=2", "log_every=1", f"out_dir={tmp_path / 'run'}"]
    folder = train(load_train_config(None, args))
    net = methods.load(folder).with_options(fast_finetune_steps=1, fast_finetune_rank=2)
    assert type(net) is HyperDreamBooth and net.config.encoder == str(tiny_clip)
    backbone = load_backbone(tiny_sd)
    refs = torch.rand(1, 2, 3, backbone.resolution, backbone.resolution) * 2 - 1
    weights = net.personalize(refs, backbone, class_names=["toy"])
    assert set(weights.ranks.values()) == {1 + 2} and net.seconds_per_subject > 0
    path = tmp_path / "toy.safetensors"
    save_lora(path, weights.select(0), models=backbone.components, method=net.method)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.load_lora_weights(str(path))  # diffusers reads the rank-(r + r') file
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())


def test_text_encoder_lora_is_predicted_preoptimized_and_exported(tiny_sd, tiny_clip, tmp_path):
    from hyperbooth.cli import main
    from hyperbooth.lora.io import load_lora
    from tests.train.conftest import write_photo

    photos = tmp_path / "faces"
    for i, color in enumerate(((220, 30, 30), (30, 200, 30))):
        write_photo(photos / f"{i:03d}.png", color, shift=i, size=16)
    lidb = ["rank=1", "a=16", "b=8", "text_targets=[q_proj, v_proj]"]
    out = tmp_path / "preopt"
    assert main(["preoptimize", *lidb, f"base_model={tiny_sd}", f"out_dir={out}", f"data_path={photos}", "class_name=person",
                 "identities=2", "shard_size=2", "steps=2", "device=cpu"]) == 0
    args = ["method=hyperdreambooth", "hypernet={rank: 1, a: 16, b: 8, d_model: 32, layers: 1, heads: 2, iterations: 2, text_targets: [q_proj, v_proj]}",
            f"hypernet.encoder={tiny_clip}", f"hypernet.targets_path={out}", f"base_model={tiny_sd}", "data.kind=folder", f"data.path={photos}",
            "data.class_name=person", "data.num_workers=0", "optim.batch_size=2", "optim.max_steps=2", f"out_dir={tmp_path / 'run'}"]
    net = methods.load(train(load_train_config(None, args))).with_options(fast_finetune_steps=1)
    backbone = load_backbone(tiny_sd)
    refs = torch.rand(1, 1, 3, backbone.resolution, backbone.resolution) * 2 - 1
    weights = net.personalize(refs, backbone, class_names=["person"])
    assert set(weights) == {"unet", "text_encoder"}
    assert all(name.endswith(("q_proj", "v_proj")) for name in weights["text_encoder"])
    for layout in ("diffusers", "kohya"):
        path = tmp_path / f"person_{layout}.safetensors"
        save_lora(path, {c: w.select(0) for c, w in weights.items()}, layout, models=backbone.components, method=net.method)
        assert set(load_lora(path, backbone.components).components) == {"unet", "text_encoder"}
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.load_lora_weights(str(tmp_path / "person_diffusers.safetensors"))
    assert any("lora" in name for name, _ in pipe.text_encoder.named_parameters())
