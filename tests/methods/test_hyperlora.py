"""HyperLoRA: the basis mixing, L2-normalised coefficients averaged over references, ID-only vs ID + Base output,
coefficient interpolation, the three stages' parameters and settings, and bad configs."""

import dataclasses

import pytest
import torch

from hyperbooth import methods
from hyperbooth.backbones import load_backbone
from hyperbooth.errors import CheckpointError, ConfigError
from hyperbooth.methods.hyperlora import HyperLoRA, HyperLoRAConfig, draw_settings, mix_basis, subject_views

SHAPES = {"a.to_q": (8, 8), "a.to_k": (12, 8), "b.to_q": (16, 24)}
CFG = HyperLoRAConfig(rank=4, num_basis=6, d_model=32, depth=1, heads=2, id_tokens=2)  # the frozen pre-trained world encoder


def _trained_like(net: HyperLoRA) -> HyperLoRA:
    """Up-bases moved off zero (as after training), so that the LoRAs are not zero; the stages before its own done."""
    g = torch.Generator().manual_seed(3)
    net.stage_reached.fill_(net.config.stage - 1)
    with torch.no_grad():
        for basis in [net.id_basis] + ([net.base_basis] if net.config.base_lora else []):
            for up in basis.up.parameters():  # the up bases (lora_space "free": the up heads' weights and biases)
                up.copy_(torch.randn(up.shape, generator=g) * 0.1)
    return net


def test_basis_mixing_is_the_explicit_sum():
    g = torch.Generator().manual_seed(0)
    cA, cB = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    down, up = torch.randn(5, 12, 4, generator=g), torch.randn(5, 4, 7, generator=g)
    layer = mix_basis(cA, cB, down, up, alpha=2.0)
    for n in range(3):
        A = sum(cA[n, k] * down[k].T for k in range(5))
        B = sum(cB[n, k] * up[k].T for k in range(5))
        torch.testing.assert_close(layer.A[n], A)
        torch.testing.assert_close(layer.B[n], B)
    assert layer.scale == 0.5  # alpha r / 2: the released models' kohya alpha
    with pytest.raises(ConfigError, match="coefficients for a basis"):
        mix_basis(cA[:, :4], cB, down, up, 2.0)


def test_coefficients_are_normalised_and_averaged_over_references():
    net = _trained_like(HyperLoRA(CFG, SHAPES)).eval()
    refs = torch.rand(2, 3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        single = [net.coefficients(refs[:, j:j + 1]) for j in range(3)]
        for c in single:
            for value in c.values():
                torch.testing.assert_close(value.norm(dim=-1), torch.ones(value.shape[:-1]))
        together = net.coefficients(refs)
        for key in together:
            torch.testing.assert_close(together[key], sum(c[key] for c in single) / 3)  # the mean of the per-reference ones
        averaged = {key: sum(c[key] for c in single) / 3 for key in together}
        a, b = net(refs).deltas(), net.weights(averaged).deltas()
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)


def test_id_only_output_has_no_base_lora_and_the_full_one_adds_it_scaled():
    net = _trained_like(HyperLoRA(CFG, SHAPES)).eval()
    refs = torch.rand(2, 1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        coeffs = net.coefficients(refs)
        only = net.weights(coeffs, base_scale=0)
        full = net.weights(coeffs, base_scale=0.25)
        ident, base = net.id_lora(coeffs).deltas(), net.base_lora(coeffs).deltas()
    assert set(only.ranks.values()) == {4} and set(full.ranks.values()) == {4 + 2}  # r, and r + r/2
    assert {l.alpha for l in only.values()} == {2.0} and {l.alpha for l in full.values()} == {3.0}  # alpha = rank / 2, as released
    for name in SHAPES:
        torch.testing.assert_close(only.deltas()[name], ident[name])
        torch.testing.assert_close(full.deltas()[name], ident[name] + 0.25 * base[name])
    assert set(net.with_options(base_lora_scale=0)(refs).ranks.values()) == {4}
    with pytest.raises(ConfigError, match="'rank' is not an inference option"):
        net.with_options(rank=2)
    no_base = HyperLoRA(dataclasses.replace(CFG, base_lora=False), SHAPES)
    assert set(no_base(refs).ranks.values()) == {4} and not any(n.startswith("base_") for n, _ in no_base.named_parameters())


def test_interpolation_runs_in_coefficient_space():
    net = _trained_like(HyperLoRA(CFG, SHAPES)).eval()
    a, b = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        wa, wb, half = net(a[None]).deltas(), net(b[None]).deltas(), net.interpolate(a, b, 0.5)
        ca, cb = net.coefficients(a[None]), net.coefficients(b[None])
        mid = net.weights({k: (ca[k] + cb[k]) / 2 for k in ca}).deltas()
        ends = net.interpolate(a, b, 0.0).deltas(), net.interpolate(a, b, 1.0).deltas()
    for name in SHAPES:
        torch.testing.assert_close(half.deltas()[name], mid[name])
        torch.testing.assert_close(ends[0][name], wa[name])
        torch.testing.assert_close(ends[1][name], wb[name])


def test_free_lora_space_maps_each_latent_to_its_factor_linearly():
    free = dataclasses.replace(CFG, lora_space="free")
    net = HyperLoRA(free, SHAPES).eval()
    refs = torch.rand(2, 3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert all(d.abs().max() == 0 for d in net(refs).deltas().values())  # ΔW = 0 at init, as with a basis
        net = _trained_like(net)
        coeffs = net.coefficients(refs)
        assert coeffs["id"].shape == (2, 2 * len(SHAPES), free.d_model) and free.coefficient_dim == free.d_model
        ident = net.id_lora(coeffs)
        for name, (d_in, d_out) in SHAPES.items():
            assert ident[name].A.shape == (2, 4, d_in) and ident[name].B.shape == (2, d_out, 4)
        single = [net.coefficients(refs[:, j:j + 1]) for j in range(3)]
        per_ref = [net.id_lora(c) for c in single]  # linear maps: the factors of the mean features are the mean factors
        for name in SHAPES:
            torch.testing.assert_close(ident[name].A, sum(w[name].A for w in per_ref) / 3)
            torch.testing.assert_close(ident[name].B, sum(w[name].B for w in per_ref) / 3)
        meta = net.subject_metadata(1)
        back = net.coefficients_from_metadata(meta)
        torch.testing.assert_close(back["id"][0], coeffs["id"][1])
    basis_net = HyperLoRA(CFG, SHAPES)
    basis_net._last_coefficients = {k: torch.zeros(1, 2 * len(SHAPES), CFG.num_basis) for k in ("id", "base")}
    with pytest.raises(ConfigError, match="do not fit this HyperLoRA"):  # a basis subject's file given to a free model
        net.coefficients_from_metadata(basis_net.subject_metadata(0))


@pytest.mark.parametrize("box", [[1.0, 0.0, 1.0, 0.5], [0.6, 0.2, 0.4, 0.8], [0.0, 0.0, 1.2, 1.0], [float("nan"), 0, 1, 1]])
def test_bad_subject_boxes_are_named(box):
    with pytest.raises(ConfigError, match="subject box"):
        subject_views(torch.zeros(1, 3, 32, 32), torch.tensor([box]))
    with pytest.raises(ConfigError, match="2 subject boxes for 1 images"):
        subject_views(torch.zeros(1, 3, 32, 32), torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]]))


def test_subject_views_crop_the_box_and_remove_it():
    images = torch.zeros(1, 3, 32, 32)
    images[..., 8:24, 8:24] = 1.0  # a white square subject on black
    crop, removed = subject_views(images, torch.tensor([[0.25, 0.25, 0.75, 0.75]]))
    assert crop.min() > 0.99  # the box is the subject, stretched to the frame
    assert removed.abs().max() == 0  # the box takes the colour around it: nothing of the subject is left
    assert torch.equal(removed[..., :8, :], images[..., :8, :])  # outside the box: untouched
    default_crop, _ = subject_views(images)  # the centred square of side 0.75
    assert default_crop.shape == images.shape


def test_settings_are_drawn_in_the_configured_proportions():
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0))
    setting = draw_settings(u, 0.9, 0.05)
    fractions = torch.bincount(setting, minlength=3).float() / len(u)
    torch.testing.assert_close(fractions, torch.tensor([0.9, 0.05, 0.05]), atol=3e-3, rtol=0)
    assert draw_settings(torch.tensor([0.0, 0.899, 0.9, 0.949, 0.95, 0.999]), 0.9, 0.05).tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("bad, message", [
    ({"stage": 4}, "stage=4 must be 1, 2 or 3"), ({"stage": 0}, "stage=0"),
    ({"p_reconstruct": 0.8}, "sum to 1"), ({"p_id_only": -0.05, "p_base_id": 0.15}, "sum to 1"),
    ({"stage": 1, "base_lora": False}, "needs hypernet.base_lora"), ({"base_lora_scale": -1.0}, "base_lora_scale"),
    ({"encoder": "world"}, "frozen one"), ({"id_embedding": "arcface"}, "id_embedding='arcface'"),
    ({"subject_box": "dlib"}, "subject_box='dlib'"), ({"face_margin": -0.1}, "face_margin"),
    ({"lora_space": "svd"}, "lora_space='svd'"),
])
def test_bad_configs_are_named(bad, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(CFG, **bad).validate()


@pytest.mark.parametrize("stage, space", [(1, "basis"), (2, "basis"), (3, "basis"), (2, "free")])
def test_each_stage_trains_only_its_parameters(stage, space, tiny_world_model):
    from hyperbooth.diffusion import forward_process, loss_weights, training_scheduler
    from hyperbooth.methods.base import TrainBatch

    backbone = load_backbone(tiny_world_model)
    net = _trained_like(HyperLoRA.for_backbone(dataclasses.replace(CFG, stage=stage, p_reconstruct=0.5, p_id_only=0.25, p_base_id=0.25,
                                                                   lora_space=space), backbone))
    trained = set(net.stage_parameters(stage))
    assert trained and all(p.requires_grad == (n in trained) for n, p in net.named_parameters() if not n.startswith("encoder."))
    scheduler = training_scheduler(backbone.scheduler.config)
    torch.manual_seed(stage)
    x0, noise, t = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randn(4, 3, 32, 32), torch.tensor([10, 300, 600, 900])
    x_t, target = forward_process(scheduler, x0, noise, t)
    prompts = ["a sks ball", "a sks toy in the snow", "a sks vase", "a sks backpack on the beach"]
    batch = TrainBatch(references=torch.rand(4, 1, 3, 32, 32) * 2 - 1, x0=x0, noise=noise, t=t, x_t=x_t, target=target,
                       cond=backbone.encode_prompts(prompts), loss_weights=loss_weights(scheduler, t, 5.0), prompts=prompts,
                       class_names=["ball", "toy", "vase", "backpack"])
    loss, scalars = net.training_loss(batch, backbone)
    loss.backward()
    for name, p in net.named_parameters():
        if name in trained:
            continue
        assert p.grad is None, f"stage {stage} changed {name}"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in net.named_parameters() if n in trained)
    assert set(scalars) == ({"reconstruct"} if stage == 1 else {"reconstruct", "id_only", "base_id"})


def test_a_checkpoint_for_other_targets_is_refused(tiny_world_model, tmp_path):
    folder = HyperLoRA(CFG, SHAPES).save_pretrained(tmp_path / "hl")
    loaded = methods.load(folder)
    assert type(loaded) is HyperLoRA
    with pytest.raises(CheckpointError, match="built for another backbone"):
        loaded.check_backbone(load_backbone(tiny_world_model), source=folder)


def test_cli_personalize_with_base_lora_scale(tiny_world_model, tmp_path, capsys):
    from PIL import Image

    from hyperbooth.cli import main
    from hyperbooth.lora import load_lora

    backbone = load_backbone(tiny_world_model)
    folder = _trained_like(HyperLoRA.for_backbone(CFG, backbone)).save_pretrained(tmp_path / "hl")
    image = tmp_path / "ref.png"
    Image.new("RGB", (32, 32), (30, 160, 40)).save(image)
    args = ["personalize", "--images", str(image), "--hypernet", str(folder), "--model", str(tiny_world_model)]
    for scale, rank in (("0.25", 4 + 2), ("0", 4)):
        out = tmp_path / f"s{scale}.safetensors"
        assert main([*args, "--base-lora-scale", scale, "--out", str(out)]) == 0
        assert set(load_lora(out, backbone.unet).unet.ranks.values()) == {rank}
    assert main([*args, "--base-lora-scale", "-1", "--out", str(tmp_path / "bad.safetensors")]) == 2
    assert "base_lora_scale=-1" in capsys.readouterr().err and not (tmp_path / "bad.safetensors").exists()
    assert main([*args[:3], "--method", "hyperlora", "--model", str(tiny_world_model), "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err  # the shipped checkpoint is for the shipped world model, not this tiny one: refused, named
    assert "hyperlora personalizer" in err and "first target that differs" in err


def _batch(backbone, prompts, seed=0):
    from hyperbooth.diffusion import forward_process, loss_weights, training_scheduler
    from hyperbooth.methods.base import TrainBatch

    scheduler = training_scheduler(backbone.scheduler.config)
    g = torch.Generator().manual_seed(seed)
    n = len(prompts)
    x0, noise = torch.rand(n, 3, 32, 32, generator=g) * 2 - 1, torch.randn(n, 3, 32, 32, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    x_t, target = forward_process(scheduler, x0, noise, t)
    return TrainBatch(references=torch.rand(n, 1, 3, 32, 32, generator=g) * 2 - 1, x0=x0, noise=noise, t=t, x_t=x_t, target=target,
                      cond=backbone.encode_prompts(prompts), loss_weights=loss_weights(scheduler, t, 5.0), prompts=prompts, class_names=[None] * n)


@pytest.mark.parametrize("setting", ["id_only", "base_id"])
def test_the_untriggered_settings_are_held_to_their_teachers(setting, tiny_world_model):
    """All samples in one setting: the loss is the MSE to the frozen base model (ID-only) or to the Base-LoRA model
    (Base + ID), both on the prompt without its trigger word — computed here by hand."""
    backbone = load_backbone(tiny_world_model)
    p = {"p_reconstruct": 0.0, "p_id_only": 1.0 if setting == "id_only" else 0.0, "p_base_id": 1.0 if setting == "base_id" else 0.0}
    net = _trained_like(HyperLoRA.for_backbone(dataclasses.replace(CFG, stage=2, **p), backbone)).eval()
    batch = _batch(backbone, ["a sks ball", "a sks toy in the snow", "a sks vase"])
    with torch.no_grad():
        loss, scalars = net.training_loss(batch, backbone)
        coeffs = net.coefficients(batch.references)
        plain = backbone.encode_prompts(["a ball", "a toy in the snow", "a vase"])
        base = net.base_lora(coeffs)
        if setting == "id_only":
            teacher = backbone.denoise(batch.x_t, batch.t, plain)
            student_lora = net.id_lora(coeffs)
        else:
            with backbone.apply_lora(base, mode="per_sample"):
                teacher = backbone.denoise(batch.x_t, batch.t, plain)
            student_lora = net.weights(coeffs, base_scale=1.0)
        with backbone.apply_lora(student_lora, mode="per_sample"):
            student = backbone.denoise(batch.x_t, batch.t, plain)
        expected = ((student - teacher).pow(2).flatten(1).mean(1) * batch.loss_weights).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    assert scalars[setting] > 0 and scalars["reconstruct"] == 0


def test_stages_follow_each_other_and_stage_3_starts_where_stage_2_ended(tiny_world_model, tmp_path):
    backbone = load_backbone(tiny_world_model)
    fresh = HyperLoRA.for_backbone(dataclasses.replace(CFG, stage=2), backbone)
    with pytest.raises(ConfigError, match="stage=2 continues a stage-1 model"):
        fresh.training_loss(_batch(backbone, ["a sks ball"]), backbone)
    two = _trained_like(HyperLoRA.for_backbone(dataclasses.replace(CFG, stage=2), backbone))
    two.train()
    folder = two.save_pretrained(tmp_path / "two")  # saved by training: it has reached stage 2
    three = HyperLoRA.for_backbone(dataclasses.replace(CFG, stage=3), backbone)
    three.load_state_dict(methods.load(folder).state_dict())
    assert int(three.stage_reached) == 2
    refs = torch.rand(2, 1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        a, b = two.eval().coefficients(refs), three.eval().coefficients(refs)  # the ID path on, its output still zero
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    three.train()
    three.training_loss(_batch(backbone, ["a sks ball"]), backbone)  # stage 3 after stage 2: accepted


def test_mix_of_hyperlora_files_runs_in_coefficient_space(tiny_world_model, tmp_path, capsys):
    from PIL import Image

    from hyperbooth.cli import main
    from hyperbooth.personalize import mix_loras

    backbone = load_backbone(tiny_world_model)
    net = _trained_like(HyperLoRA.for_backbone(CFG, backbone))
    folder = net.save_pretrained(tmp_path / "hl")
    files = []
    for name, color in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
        Image.new("RGB", (32, 32), color).save(tmp_path / f"{name}.png")
        out = tmp_path / f"{name}.safetensors"
        assert main(["personalize", "--images", str(tmp_path / f"{name}.png"), "--hypernet", str(folder), "--model", str(tiny_world_model),
                     "--out", str(out)]) == 0
        files.append(out)
    loaded = methods.load(folder)
    mixed = mix_loras([(files[0], 0.5), (files[1], 0.5)], backbone.components, loaded)["unet"]
    from hyperbooth.images import load_image

    a, b = load_image(tmp_path / "a.png", size=32)[None], load_image(tmp_path / "b.png", size=32)[None]
    expected = loaded.interpolate(a, b, 0.5)
    for name in expected:
        torch.testing.assert_close(mixed[name].delta(), expected[name].delta(), rtol=1e-4, atol=1e-6)
    in_delta = mix_loras([(files[0], 0.5), (files[1], 0.5)], backbone.components)["unet"]  # without the HyperLoRA: ΔW
    assert any(not torch.allclose(in_delta[n].delta(), mixed[n].delta(), atol=1e-6) for n in mixed)
    assert main(["generate", "--prompt", "a sks ball", "--mix", f"{files[0]}:0.5", f"{files[1]}:0.5", "--hypernet", str(folder),
                 "--model", str(tiny_world_model), "--steps", "1", "--out", str(tmp_path / "grid.png")]) == 0


# -- faces (dlib): the ID embedding and the subject box of HyperLoRA on photos ------------------------------------

FACE_CFG = dataclasses.replace(CFG, id_embedding="face", subject_box="face", face_margin=0.5, stage=3)


def _fake_faces(monkeypatch, faces):
    """dlib's answer per image, by the image's mean value (the tests' references are flat colours)."""
    import numpy as np

    from hyperbooth.faces import Face, FaceAnalyzer

    def find(self, images):
        answers = [faces[round(float(image.mean()), 1)] for image in images]
        return [None if a is None else Face(a[0], np.asarray(a[1], dtype=np.float32)) for a in answers]

    monkeypatch.setattr(FaceAnalyzer, "__init__", lambda self, upsample=1: None)  # no dlib models needed
    monkeypatch.setattr(FaceAnalyzer, "find", find)


def test_face_descriptor_feeds_the_id_projector_and_the_face_box_cuts_the_views(monkeypatch):
    g = torch.Generator().manual_seed(0)
    d1, d2 = torch.randn(128, generator=g), torch.randn(128, generator=g)
    _fake_faces(monkeypatch, {0.2: ((0.25, 0.25, 0.75, 0.5), d1.tolist()), -0.2: ((0.25, 0.25, 0.75, 0.5), d2.tolist())})
    net = _trained_like(HyperLoRA(FACE_CFG, SHAPES)).eval()
    assert net.id_projector[0].in_features == 128  # dlib's descriptor, not the encoder's width
    seen = []
    monkeypatch.setattr(net.id_projector, "forward", lambda x: (seen.append(x.clone()), torch.nn.Sequential.forward(net.id_projector, x))[1])
    a, b = torch.full((1, 1, 3, 32, 32), 0.2), torch.full((1, 1, 3, 32, 32), -0.2)
    with torch.no_grad():
        ca, cb = net.coefficients(a), net.coefficients(b)
    torch.testing.assert_close(seen[0][0], d1)
    torch.testing.assert_close(seen[1][0], d2)
    assert not torch.allclose(ca["id"], cb["id"])  # the identity embedding moves the ID-LoRA
    # the views follow the face box grown by face_margin on each side: (0.25, 0.25, 0.75, 0.5) -> (0, 0.125, 1, 0.625)
    boxes, _ = net.face_views(a[0])
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0.125, 1.0, 0.625]]))


def test_a_reference_without_a_face_is_an_error_at_inference_and_a_fallback_in_training(monkeypatch):
    _fake_faces(monkeypatch, {0.2: None})
    net = _trained_like(HyperLoRA(FACE_CFG, SHAPES))
    refs = torch.full((1, 1, 3, 32, 32), 0.2)
    from hyperbooth.faces import NoFaceError

    with pytest.raises(NoFaceError, match="reference image 0: dlib finds no face"):
        net.eval().coefficients(refs)
    net.train()
    boxes, descriptors = net.face_views(refs[0])
    assert boxes.tolist() == [[0.125, 0.125, 0.875, 0.875]] and descriptors.abs().sum() == 0  # centred box, zero descriptor
    assert net.faces_missing == 1


def test_cli_names_the_photo_in_which_dlib_finds_no_face(tiny_world_model, tmp_path, capsys):
    """Real dlib on a picture without a face: the file is named, exit 2, no LoRA file written."""
    pytest.importorskip("dlib")
    from PIL import Image

    from hyperbooth.cli import main

    backbone = load_backbone(tiny_world_model)
    folder = _trained_like(HyperLoRA.for_backbone(dataclasses.replace(CFG, subject_box="face"), backbone)).save_pretrained(tmp_path / "hl")
    image = tmp_path / "no_face.png"
    Image.new("RGB", (96, 96), (30, 160, 40)).save(image)
    out = tmp_path / "s.safetensors"
    code = main(["personalize", "--images", str(image), "--hypernet", str(folder), "--model", str(tiny_world_model), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and f"{image}: dlib finds no face" in err and not out.exists()
