"""DreamBooth-LoRA fine-tuning (the baseline) and the time-vs-fidelity benchmark's arithmetic, on tiny models."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from hyperbooth.cli import main
from hyperbooth.backbones.world import WorldBackbone
from hyperbooth.diffusion import diffusion_loss, forward_process, training_scheduler
from hyperbooth.errors import ConfigError, LoRAFileError
from hyperbooth.grids import to_uint8
from hyperbooth.lora import LoRAInjector, apply_lora, load_lora, save_lora, target_shapes
from hyperbooth.methods.dreambooth_lora import FinetuneConfig, finetune, init_lora
from hyperbooth.world.fidelity import reference_images

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "time_vs_fidelity.py"


@pytest.fixture(scope="module")
def base(tiny_world_model):
    return WorldBackbone.from_pretrained(tiny_world_model)


@pytest.fixture(scope="module")
def refs():
    return reference_images(identity_seed=7, k=3, resolution=32)  # (3, 3, 32, 32)


def _benchmark():
    spec = importlib.util.spec_from_file_location("time_vs_fidelity", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _unet_output(base, weights=None):
    g = torch.Generator().manual_seed(5)
    x_t = torch.randn(2, 3, 32, 32, generator=g)
    t = torch.tensor([100, 700])
    cond = base.encode_prompts(["a sks toy", "a sks toy in the snow"])
    with torch.no_grad():
        if weights is None:
            return base.denoise(x_t, t, cond)
        with apply_lora(base.unet, weights, mode="merged"):
            return base.denoise(x_t, t, cond)


def test_three_steps_give_a_loadable_lora_that_changes_the_unet_and_leave_the_base_untouched(base, refs, tmp_path):
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    plain = _unet_output(base)
    weights, stats = finetune(base, refs, "toy", FinetuneConfig(steps=3))
    assert stats.steps == 3 and len(stats.losses) == 3 and stats.seconds > 0 and stats.class_image_seconds == 0
    assert set(weights) == set(target_shapes(base.unet)) and weights.num_subjects == 1
    assert all(layer.rank == 4 and layer.alpha == 4.0 for layer in weights.values())
    assert all(torch.count_nonzero(layer.B) > 0 for layer in weights.values())  # B moved from zero everywhere
    assert not any(layer.A.requires_grad or layer.B.requires_grad for layer in weights.values())  # returned detached

    # the base UNet: bit-exact, still frozen, and no gradient ever reached it
    after = base.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad and p.grad is None for p in base.unet.parameters())
    torch.testing.assert_close(_unet_output(base), plain, rtol=0, atol=0)

    path = save_lora(tmp_path / "subject.safetensors", weights, "diffusers", models={"unet": base.unet}, method="dreambooth-lora", base_model="tiny")
    lora = load_lora(path, base.unet)
    assert lora.metadata["hyperbooth.method"] == "dreambooth-lora"
    for name, delta in weights.deltas().items():
        torch.testing.assert_close(lora.unet.deltas()[name], delta)
    assert (_unet_output(base, lora.unet) - plain).abs().max() > 0


def test_callback_sees_every_step_from_the_base_model_and_runs_are_reproducible(base, refs):
    seen = []
    w1, _ = finetune(base, refs, "toy", FinetuneConfig(steps=3, seed=3), callback=lambda step, w: seen.append((step, w)))
    assert [s for s, _ in seen] == [0, 1, 2, 3]
    assert all(torch.count_nonzero(layer.B) == 0 for layer in seen[0][1].values())  # step 0: ΔW = 0, the base model
    for name, delta in seen[-1][1].deltas().items():  # snapshots are copies, not views of the live factors
        torch.testing.assert_close(delta, w1.deltas()[name])
    assert not torch.equal(seen[1][1][name].B, seen[3][1][name].B)
    w2, _ = finetune(base, refs, "toy", FinetuneConfig(steps=3, seed=3))
    assert all(torch.equal(w1[n].A, w2[n].A) and torch.equal(w1[n].B, w2[n].B) for n in w1)
    w3, _ = finetune(base, refs, "toy", FinetuneConfig(steps=3, seed=4))
    assert not torch.equal(w1[name].A, w3[name].A)


def _fixed_loss(base, weights, image, prompt):
    """The diffusion loss of ``image`` at 16 fixed (noise, t) pairs, with ``weights`` applied."""
    g = torch.Generator().manual_seed(123)
    x0 = image[None].expand(16, -1, -1, -1)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.linspace(20, 980, 16).long()
    x_t, target = forward_process(training_scheduler(base.scheduler.config), x0, noise, t)
    cond = base.encode_prompts([prompt] * 16)
    with torch.no_grad(), LoRAInjector(base.unet).apply(weights, mode="shared"):
        pred = base.denoise(x_t, t, cond)
    return diffusion_loss(pred, target).item()


def test_init_starts_from_the_given_lora_and_leaves_it_unchanged(base, refs):
    """HyperDreamBooth's fast fine-tune starts from a predicted LoRA: step 0 is that LoRA, and the caller's tensors
    are copied, not trained in place."""
    init = init_lora(target_shapes(base.unet), 2, torch.Generator().manual_seed(9))
    init = init.map(lambda l: type(l)(l.A.detach(), torch.randn(l.B.shape, generator=torch.Generator().manual_seed(3)) * 0.01, l.alpha))
    before = {n: (l.A.clone(), l.B.clone()) for n, l in init.items()}
    seen = {}
    weights, _ = finetune(base, refs, "toy", FinetuneConfig(steps=2, rank=4), callback=lambda s, w: seen.__setitem__(s, w), init=init)
    assert all(torch.equal(seen[0][n].A, init[n].A) and torch.equal(seen[0][n].B, init[n].B) for n in init)  # step 0 = init
    assert all(torch.equal(l.A, before[n][0]) and torch.equal(l.B, before[n][1]) for n, l in init.items())  # init untouched
    assert all(not l.A.requires_grad and not l.B.requires_grad for l in init.values())
    assert all(layer.rank == 2 for layer in weights.values())  # init's rank, not cfg.rank
    assert any(not torch.equal(weights[n].B, init[n].B) for n in init)  # and it trained from there
    with pytest.raises(ConfigError, match="one subject"):
        finetune(base, refs, "toy", FinetuneConfig(steps=1), init=init_lora(target_shapes(base.unet), 2, torch.Generator()).map(
            lambda l: type(l)(l.A.detach().repeat(2, 1, 1), l.B.detach().repeat(2, 1, 1), l.alpha)))
    foreign = init_lora({"no.such.module": (4, 4)}, 2, torch.Generator())
    with pytest.raises(LoRAFileError, match="no.such.module"):
        finetune(base, refs, "toy", FinetuneConfig(steps=1), init=foreign)


def test_trained_factors_stay_float32_on_a_bf16_backbone(tiny_world_model, refs):
    """A LoRA trained in bf16 would lose lr-1e-4 updates to rounding: the factors are fp32, cast in the forward."""
    half = WorldBackbone.from_pretrained(tiny_world_model, dtype=torch.bfloat16)
    weights, stats = finetune(half, refs[:1], "toy", FinetuneConfig(steps=2, lr=1e-4, seed=0))
    assert all(layer.A.dtype == layer.B.dtype == torch.float32 for layer in weights.values())
    assert any(layer.B.abs().max() > 0 for layer in weights.values())  # B left zero: the updates were applied
    assert half.unet.dtype == torch.bfloat16 and all(math.isfinite(x) for x in stats.losses)


def test_loss_decreases_on_one_image(base, refs):
    snapshots = {}
    cfg = FinetuneConfig(steps=20, lr=1e-2, flip_p=0.0, seed=1)  # a high lr: the tiny base model is nearly random
    weights, stats = finetune(base, refs[:1], "toy", cfg, callback=lambda s, w: snapshots.__setitem__(s, w))
    start, end = _fixed_loss(base, snapshots[0], refs[0], "a sks toy"), _fixed_loss(base, weights, refs[0], "a sks toy")
    assert end < 0.92 * start, (start, end)  # measured: 0.759 → ~0.67
    assert all(math.isfinite(x) for x in stats.losses)


def test_prior_preservation_generates_class_images_and_adds_the_prior_loss(base, refs):
    cfg = FinetuneConfig(steps=2, prior_preservation=True, num_class_images=2, class_sample_steps=2, prior_weight=0.5)
    weights, stats = finetune(base, refs, "toy", cfg)
    assert len(stats.prior_losses) == 2 and all(math.isfinite(x) and x > 0 for x in stats.prior_losses)
    assert stats.class_image_seconds > 0 and stats.seconds >= stats.class_image_seconds
    assert all(torch.isfinite(layer.B).all() for layer in weights.values())


def test_api_rejects_bad_input_by_name(base, refs):
    with pytest.raises(ConfigError, match="rank=0"):
        finetune(base, refs, "toy", FinetuneConfig(rank=0))
    with pytest.raises(ConfigError, match="lr=-1"):
        finetune(base, refs, "toy", FinetuneConfig(lr=-1.0))
    with pytest.raises(ConfigError, match="16x16"):
        finetune(base, refs[:, :, :16, :16], "toy", FinetuneConfig(steps=1))
    with pytest.raises(ConfigError, match="class name"):
        finetune(base, refs, "  ", FinetuneConfig(steps=1))


def _write_refs(folder: Path, refs) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, array in enumerate(to_uint8(refs)):
        path = folder / f"ref{i}.png"
        Image.fromarray(array).resize((48, 48)).save(path)  # any size: the CLI crops and resizes
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_cli_writes_both_formats(tiny_world_model, refs, tmp_path, fmt, capsys):
    from diffusers import UNet2DConditionModel

    images = _write_refs(tmp_path / "refs", refs)
    out = tmp_path / f"subject_{fmt}.safetensors"
    code = main(["finetune", "--images", *images, "--out", str(out), "--class-name", "toy", "--model", str(tiny_world_model),
                 "--steps", "2", "--format", fmt, "--seed", "1"])
    assert code == 0 and "wrote" in capsys.readouterr().out
    unet = UNet2DConditionModel.from_pretrained(tiny_world_model, subfolder="unet")
    lora = load_lora(out, unet)
    assert lora.format == fmt and set(lora.unet) == set(target_shapes(unet))
    assert lora.metadata["hyperbooth.method"] == "dreambooth-lora" and lora.metadata["hyperbooth.instance_prompt"] == "a sks toy"
    assert json.loads(lora.metadata["hyperbooth.finetune_config"])["steps"] == 2
    assert any(torch.count_nonzero(layer.B) > 0 for layer in lora.unet.values())
    if fmt == "diffusers":
        unet.load_lora_adapter(str(out), prefix="unet")  # diffusers' own loader
        assert any("lora" in name for name, _ in unet.named_modules())


@pytest.mark.parametrize("case", ["empty_folder", "not_an_image", "steps_0", "rank_0", "missing_out_folder", "lr_0"])
def test_cli_bad_input_exits_2_naming_the_value_and_writes_nothing(tiny_world_model, refs, tmp_path, case, capsys):
    images = _write_refs(tmp_path / "refs", refs[:1])
    out = tmp_path / "subject.safetensors"
    extra, expect = [], None
    if case == "empty_folder":
        (tmp_path / "empty").mkdir()
        images, expect = [str(tmp_path / "empty")], "empty"
    elif case == "not_an_image":
        bad = tmp_path / "notes.png"
        bad.write_text("not an image")
        images, expect = [images[0], str(bad)], "notes.png"
    elif case == "steps_0":
        extra, expect = ["--steps", "0"], "--steps=0"
    elif case == "rank_0":
        extra, expect = ["--rank", "0"], "--rank=0"
    elif case == "lr_0":
        extra, expect = ["--lr", "0"], "--lr=0"
    else:
        out, expect = tmp_path / "missing" / "subject.safetensors", "missing"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code = main(["finetune", "--images", *images, "--out", str(out), "--class-name", "toy", "--model", str(tiny_world_model), "--steps", "1", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and expect in err and "\n" not in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.rglob("*")) == before


def test_cli_without_images_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--images", "--out", str(tmp_path / "x.safetensors"), "--class-name", "toy"])
    assert exit_info.value.code == 2 and not (tmp_path / "x.safetensors").exists()


# -- the benchmark's arithmetic -----------------------------------------------------------------------------------


def test_time_to_equal_fidelity_interpolates_between_checkpoints():
    bench = _benchmark()
    seconds, fidelity = [0.0, 10.0, 20.0, 40.0], [0.1, 0.3, 0.5, 0.7]
    assert bench.time_to_reach(seconds, fidelity, 0.4) == pytest.approx(15.0)
    assert bench.time_to_reach(seconds, fidelity, 0.5) == pytest.approx(20.0)  # exactly at a checkpoint
    assert bench.time_to_reach(seconds, fidelity, 0.05) == 0.0  # reached at the first point
    assert bench.time_to_reach([2.0, 5.0], [0.6, 0.7], 0.5) == 2.0
    assert bench.time_to_reach(seconds, fidelity, 0.71) is None  # never reached
    # the first crossing counts, even if the curve dips afterwards; NaN points are skipped
    assert bench.time_to_reach([0, 10, 20, 30], [0.1, 0.5, 0.2, 0.6], 0.3) == pytest.approx(5.0)
    assert bench.time_to_reach([0, 10, 20], [0.1, float("nan"), 0.5], 0.3) == pytest.approx(10.0)
    with pytest.raises(ValueError):
        bench.time_to_reach([0, 1], [0.1], 0.2)


def test_benchmark_full_dreambooth_on_validation_identities(tiny_world_model, tmp_path, capsys):
    from hyperbooth.world.oracles import ContextClassifier, IdentityEncoder, OracleTrainConfig, save_oracles
    from hyperbooth.world.splits import split_of

    oracles = save_oracles(tmp_path / "oracles", IdentityEncoder(), ContextClassifier(), OracleTrainConfig(), {})
    code = _benchmark().main(["--model", str(tiny_world_model), "--oracles", str(oracles), "--no-hypernet", "--split", "val", "--method", "full",
                              "--lr", "1e-3", "--identities", "1", "--k", "1", "--checkpoints", "0", "2", "--prompts", "2", "--sample-steps", "2",
                              "--json", str(tmp_path / "full.json")])
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "full.json").read_text())
    assert code == 0 and "full DreamBooth, lr 0.001" in out and "1 val identities" in out
    assert all(split_of(s) == "val" for s in result["identities"])
    curve = result["dreambooth_lora"]["curve"]
    assert curve[0]["subject"] != curve[1]["subject"]  # the fine-tuned UNet samples other images than step 0


def test_checkpoint_steps_double_up_to_the_maximum():
    bench = _benchmark()
    assert bench.checkpoint_steps(400) == [0, 25, 50, 100, 200, 400]
    assert bench.checkpoint_steps(300) == [0, 25, 50, 100, 200, 300]
    assert bench.checkpoint_steps(10) == [0, 10]


def test_benchmark_runs_end_to_end_on_tiny_models(tiny_world_model, tmp_path, capsys):
    from hyperbooth.methods.e2e import E2EConfig, E2EHyperNetwork
    from hyperbooth.world.oracles import ContextClassifier, IdentityEncoder, OracleTrainConfig, save_oracles

    unet = WorldBackbone.from_pretrained(tiny_world_model).unet
    hypernet = E2EHyperNetwork(E2EConfig(d_model=32, layers=1, heads=2, encoder_dim=16), target_shapes(unet)).save_pretrained(tmp_path / "hypernet")
    oracles = save_oracles(tmp_path / "oracles", IdentityEncoder(), ContextClassifier(), OracleTrainConfig(), {})
    code = _benchmark().main(["--model", str(tiny_world_model), "--oracles", str(oracles), "--hypernet", str(hypernet),
                              "--identities", "2", "--k", "2", "--checkpoints", "0", "1", "2", "--prompts", "2",
                              "--sample-steps", "2", "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")])
    out = capsys.readouterr().out
    assert code == 0 and "time-to-equal-fidelity" in out and "torch" in out and "command:" in out
    result = json.loads((tmp_path / "r.json").read_text())
    curve = result["dreambooth_lora"]["curve"]
    assert [c["step"] for c in curve] == [0, 1, 2] and curve[0]["seconds"] <= curve[1]["seconds"] <= curve[2]["seconds"]
    assert result["hypernet"]["ms_per_subject"] > 0 and -1 <= result["hypernet"]["subject"] <= 1 and 0 <= result["hypernet"]["retrieval"] <= 1
    assert "retrieval" in out and "AUC" in out
    # the untrained hypernetwork predicts ΔW = 0, so it samples exactly what step 0 (the base model) samples
    assert result["hypernet"]["subject"] == pytest.approx(curve[0]["subject"], abs=1e-5)
    assert result["hypernet"]["retrieval"] == curve[0]["retrieval"]
    with Image.open(tmp_path / "r.png") as im:
        assert im.size == (720, 460)
    # the curve of that run is reused as is (no fine-tuning) when the settings match, refused when they do not
    args = ["--model", str(tiny_world_model), "--oracles", str(oracles), "--hypernet", str(hypernet), "--identities", "2", "--k", "2",
            "--checkpoints", "0", "1", "2", "--prompts", "2", "--sample-steps", "2", "--reuse-curve", str(tmp_path / "r.json")]
    assert _benchmark().main([*args, "--json", str(tmp_path / "again.json")]) == 0
    assert "taken from" in capsys.readouterr().out
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["dreambooth_lora"]["curve"] == curve
    from hyperbooth.errors import ConfigError

    with pytest.raises(ConfigError, match="lr=0.0001.*lr=0.001"):
        _benchmark().main([*args, "--lr", "1e-3"])
    with pytest.raises(ConfigError, match="method='lora'.*method='full'"):
        _benchmark().main([*args, "--method", "full"])
    with pytest.raises(ConfigError, match="identities"):
        _benchmark().main([*args[:-1], str(tmp_path / "r.json"), "--identities", "1"])
    # the base model and the oracles are compared by their weights, not their paths
    import shutil

    assert result["settings"]["oracles_weights"] == _benchmark().weights_digest(oracles)
    copied = shutil.copytree(oracles, tmp_path / "same_oracles_elsewhere")
    assert _benchmark().main([str(copied) if a == str(oracles) else a for a in args]) == 0
    assert "taken from" in capsys.readouterr().out
    other = save_oracles(tmp_path / "other_oracles", IdentityEncoder(), ContextClassifier(), OracleTrainConfig(), {})
    with pytest.raises(ConfigError, match="oracles_weights"):
        _benchmark().main([str(other) if a == str(oracles) else a for a in args])
    with pytest.raises(ConfigError, match="does not exist"):
        _benchmark().weights_digest(tmp_path / "nothing_here")
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "oracles.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds no .safetensors"):
        _benchmark().weights_digest(tmp_path / "no_weights")
    edited = shutil.copytree(oracles, tmp_path / "edited_config")
    (edited / "oracles.json").write_text((edited / "oracles.json").read_text() + " ")
    assert _benchmark().weights_digest(edited) != _benchmark().weights_digest(oracles)  # configs count too
    # a JSON of an older run (no digests) is compared by path: the same folder is accepted, a copy is not
    for key in ("model_weights", "oracles_weights"):
        del result["settings"][key]
    (tmp_path / "r.json").write_text(json.dumps(result))
    assert _benchmark().main(args) == 0
    with pytest.raises(ConfigError, match="oracles="):
        _benchmark().main([str(copied) if a == str(oracles) else a for a in args])
