"""Every trainable hypernetwork method on the SDXL and SD3 backbones (tiny pipelines of their own classes):
`hyperbooth train` for 2 steps (HyperLoRA: each of its three stages, each continuing the last), then personalize,
sample with HM-CFG in one call, and write a LoRA file that the pipeline's own ``load_lora_weights`` reads with the
same denoiser output as hyperbooth's."""

import pytest
import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

from hyperbooth import methods
from hyperbooth.backbones import load_backbone
from hyperbooth.generate import generate
from hyperbooth.lora.io import save_lora
from hyperbooth.tiny import tiny_sd3_pipeline, tiny_sdxl_pipeline
from hyperbooth.train.engine import load_train_config, train

PIPELINES = {"sdxl": (tiny_sdxl_pipeline, StableDiffusionXLPipeline), "sd3": (tiny_sd3_pipeline, StableDiffusion3Pipeline)}
HYPERNETS = {
    "e2e": ["hypernet={d_model: 32, layers: 1, heads: 2, rank: 2}"],
    "hyperdreambooth": ["hypernet={rank: 1, a: 16, b: 8, d_model: 32, layers: 1, heads: 2, iterations: 2, weight_loss: 0}"],
    "hyperlora": ["hypernet={rank: 4, num_basis: 6, d_model: 32, depth: 1, heads: 2, id_tokens: 2}"],
}


@pytest.fixture(scope="module", params=sorted(PIPELINES))
def pipeline(request, tmp_path_factory):
    build, cls = PIPELINES[request.param]
    return request.param, build(tmp_path_factory.mktemp(request.param) / "pipe"), cls


@pytest.mark.parametrize("method", sorted(HYPERNETS))
def test_method_trains_personalizes_samples_and_exports(method, pipeline, tiny_clip, subject_folder, tmp_path):
    name, folder, pipeline_cls = pipeline
    common = [f"method={method}", *HYPERNETS[method], f"hypernet.encoder={tiny_clip}", f"base_model={folder}", "data.kind=dreambench",
              f"data.path={subject_folder}", "data.mode=same", "data.num_workers=0", "optim.batch_size=2", "optim.warmup_steps=1",
              "optim.max_steps=2", "log_every=1",
              *(["min_snr_gamma=0"] if name == "sd3" else [])]  # flow matching trains unweighted
    stages = (1, 2, 3) if method == "hyperlora" else (None,)
    hypernet = None
    for stage in stages:
        extra = [f"out_dir={tmp_path / f'run{stage}'}"] + ([f"hypernet.stage={stage}"] if stage else []) + ([f"init_from={hypernet}"] if hypernet else [])
        hypernet = train(load_train_config(None, [*common, *extra]))
    net = methods.load(hypernet)
    backbone = load_backbone(folder)
    assert backbone.name == name and net.method == method
    net.check_backbone(backbone)
    with torch.no_grad():
        for p in net.parameters():  # output layers start at zero; move them off it, as after a longer training
            if p.abs().sum() == 0:
                p.normal_(std=0.05)
    refs = torch.rand(1, 2, 3, backbone.resolution, backbone.resolution) * 2 - 1
    with torch.no_grad():
        weights = net.personalize(refs, backbone, class_names=["toy"])
    images = generate(backbone, ["a sks toy in the snow"], weights, guidance="hm-cfg", steps=2, seed=0)
    assert images.shape == (1, 3, backbone.resolution, backbone.resolution) and torch.isfinite(images).all()

    path = tmp_path / "subject.safetensors"
    save_lora(path, weights.select(0), models=backbone.components, method=net.method, backbone=backbone.name)
    pipe = pipeline_cls.from_pretrained(folder, **({"text_encoder_3": None, "tokenizer_3": None} if name == "sd3" else {}))
    pipe.load_lora_weights(str(path))
    denoiser = pipe.unet if name == "sdxl" else pipe.transformer
    x = torch.randn(2, *backbone.sample_shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([100.0, 700.0])
    cond = backbone.encode_prompts(["a sks toy", "a sks toy in the snow"])
    with torch.no_grad():
        if name == "sdxl":
            theirs = denoiser(x, t, encoder_hidden_states=cond.states, added_cond_kwargs=cond.added).sample
        else:
            theirs = denoiser(hidden_states=x, timestep=t, encoder_hidden_states=cond.states, pooled_projections=cond.added["pooled_projections"]).sample
        with backbone.apply_lora(weights, mode="shared"):
            ours = backbone.denoise(x, t, cond)
        plain = backbone.denoise(x, t, cond)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain, ours, atol=1e-6)  # the LoRA does something


def test_hyperlora_drops_the_trigger_word_from_the_pooled_embeddings_too(pipeline, tiny_clip):
    """HyperLoRA's untriggered settings (no trigger word, held to a teacher) re-encode their prompts: on SDXL and SD3
    the pooled text embedding (``text_embeds`` / ``pooled_projections``) must be the untriggered prompt's as well."""
    from hyperbooth.diffusion import forward_process, training_scheduler, training_timesteps
    from hyperbooth.methods.base import TrainBatch
    from hyperbooth.methods.hyperlora import HyperLoRA, HyperLoRAConfig

    name, folder, _ = pipeline
    backbone = load_backbone(folder)
    cfg = HyperLoRAConfig(rank=4, num_basis=6, d_model=32, depth=1, heads=2, id_tokens=2, encoder=str(tiny_clip), stage=2,
                          p_reconstruct=0.0, p_id_only=1.0, p_base_id=0.0)  # every row untriggered
    net = HyperLoRA.for_backbone(cfg, backbone).eval()
    net.stage_reached.fill_(1)
    prompts = ["a sks toy", "a sks toy in the snow"]
    scheduler = training_scheduler(backbone.scheduler.config)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, *backbone.sample_shape, generator=g), torch.randn(2, *backbone.sample_shape, generator=g)
    t = training_timesteps(scheduler, torch.tensor([100, 600]))
    x_t, target = forward_process(scheduler, x0, noise, t)
    batch = TrainBatch(references=torch.rand(2, 1, 3, 16, 16, generator=g) * 2 - 1, x0=x0, noise=noise, t=t, x_t=x_t, target=target,
                       cond=backbone.encode_prompts(prompts), loss_weights=torch.ones(2), prompts=prompts, class_names=[None, None])
    seen = []
    denoise = backbone.denoise
    backbone.denoise = lambda x, tt, cond: (seen.append(cond), denoise(x, tt, cond))[1]
    with torch.no_grad():
        net.training_loss(batch, backbone)
    plain = backbone.encode_prompts(["a toy", "a toy in the snow"])
    triggered = batch.cond
    assert seen and plain.added and set(plain.added) == set(triggered.added)
    for cond in seen:  # the student's and the teacher's calls
        for key in plain.added:
            torch.testing.assert_close(cond.added[key], plain.added[key])
        torch.testing.assert_close(cond.states, plain.states)
    assert any(not torch.equal(plain.added[k], triggered.added[k]) for k in plain.added)  # the trigger word moves them
