"""HyperDreamBooth: the iterative hypernetwork (zero delta at init, K steps, any K at inference), its files and the
check of its frozen bases, inference options, the rank-relaxed fast fine-tune and its exact export."""

import dataclasses
import json

import pytest
import torch

from hyperbooth import methods
from hyperbooth.backbones import load_backbone
from hyperbooth.errors import CheckpointError, ConfigError
from hyperbooth.lora.io import load_lora, save_lora
from hyperbooth.methods.e2e import E2EConfig, E2EHyperNetwork
from hyperbooth.methods.hyperdreambooth import HyperDreamBooth, HyperDreamBoothConfig, fast_finetune, lidb_init
from hyperbooth.methods.lidb import num_variables

SHAPES = {"a.to_q": (8, 8), "a.to_k": (12, 8), "b.to_q": (16, 24)}
CFG = HyperDreamBoothConfig(rank=1, a=6, b=5, d_model=32, layers=1, heads=2, encoder="world", encoder_dim=16, weight_loss=0.0)


def _perturbed(net: HyperDreamBooth, std: float = 0.05) -> HyperDreamBooth:
    """The heads moved off zero, so that refinement steps do something (as after training)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for head in net.head.values():
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * std)
    return net


def test_delta_is_zero_at_init_and_every_refinement_step_runs():
    net = HyperDreamBooth(CFG, SHAPES)
    refs = torch.rand(3, 2, 3, 32, 32) * 2 - 1
    estimates = net.estimates(refs, iterations=5)
    assert len(estimates) == 5
    for theta in estimates:  # a zero delta: every step returns the first estimate
        for g, value in theta.items():
            assert torch.equal(value, net.theta0[g].expand_as(value))
    w = net(refs)
    assert w.num_subjects == 3 and set(w) == set(SHAPES)
    assert all(torch.count_nonzero(d) == 0 for d in w.deltas().values())  # B_train = 0: the base model
    assert all(layer.A.abs().sum() > 0 for layer in w.values())  # the diffusion loss's gradient reaches B_train
    for name, (d_in, d_out) in SHAPES.items():
        assert w[name].A.shape == (3, 1, d_in) and w[name].B.shape == (3, d_out, 1)
    assert net.num_variables() == num_variables(SHAPES, 1, 6, 5) == sum(min(6, i) + min(5, o) for i, o in SHAPES.values())
    _perturbed(net)
    one, three = net(refs, iterations=1).deltas(), net(refs, iterations=3).deltas()
    assert any(not torch.allclose(one[n], three[n]) for n in one)  # later steps refine the estimate
    init = lidb_init(SHAPES, 1, 6, 5, 0)  # the first estimate starts where pre-optimization starts every identity
    for i, name in enumerate(net.names):
        g = net._group(name)
        A0, B0 = net._unflat(net.theta0[g][net.group_index[g].index(i)], name)
        assert torch.equal(A0, init[name][0]) and torch.equal(B0, init[name][1])


def test_save_and_load_reproduce_the_prediction_and_check_the_bases(tmp_path):
    net = _perturbed(HyperDreamBooth(CFG, SHAPES))
    folder = net.save_pretrained(tmp_path / "hdb")
    loaded = methods.load(folder)
    assert type(loaded) is HyperDreamBooth
    refs = torch.rand(2, 1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        a, b = net.eval()(refs).deltas(), loaded(refs).deltas()
    assert all(torch.equal(a[n], b[n]) for n in a)
    meta = json.loads((folder / "hypernet_config.json").read_text())
    meta["config"]["basis_seed"] = 7  # the stored bases no longer come from the seed the config names
    (folder / "hypernet_config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"basis A_aux of 'a.to_q' does not match basis_seed=7"):
        methods.load(folder)
    meta["config"]["basis_seed"], meta["config"]["a"] = 0, 4  # other shapes: the first mismatching key is named
    (folder / "hypernet_config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match its config"):
        methods.load(folder)


def test_inference_options_and_bad_values_are_named():
    net = HyperDreamBooth(CFG, SHAPES)
    assert net.with_options(iterations=8, fast_finetune_steps=40).config.iterations == 8
    assert net.needs_class_names and net.own_clock  # the fast fine-tune prompts "a sks <class>" and keeps its clock
    with pytest.raises(ConfigError, match="iterations=0"):
        net.with_options(iterations=0)
    with pytest.raises(ConfigError, match="fast_finetune_steps=-1"):
        net.with_options(fast_finetune_steps=-1)
    with pytest.raises(ConfigError, match="'rank' is not an inference option"):
        net.with_options(rank=2)
    with pytest.raises(ConfigError, match="iterations=0"):
        net(torch.zeros(1, 1, 3, 32, 32), iterations=0)
    with pytest.raises(ConfigError, match="no inference option 'iterations'"):
        E2EHyperNetwork(E2EConfig(d_model=32, layers=1, heads=2, encoder_dim=16), SHAPES).with_options(iterations=2)
    with pytest.raises(ConfigError, match="needs hypernet.targets_path"):
        dataclasses.replace(CFG, weight_loss=1.0).validate()
    with pytest.raises(ConfigError, match="both 0"):
        dataclasses.replace(CFG, diffusion_loss=0.0).validate()


@pytest.fixture(scope="module")
def world_and_prediction(tiny_world_model):
    backbone = load_backbone(tiny_world_model)
    net = _perturbed(HyperDreamBooth.for_backbone(CFG, backbone), std=0.02).eval()
    refs = torch.rand(2, 1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        return backbone, refs, net, net(refs)


def test_fast_finetune_for_zero_steps_returns_the_prediction(world_and_prediction):
    backbone, refs, net, predicted = world_and_prediction
    one = predicted.select(0)
    out, seconds = fast_finetune(backbone, refs[0], "ball", one, steps=0)
    assert out is one and seconds == 0.0
    with pytest.raises(ConfigError, match="steps=-1"):
        fast_finetune(backbone, refs[0], "ball", one, steps=-1)


def test_rank_relaxed_fine_tune_is_exported_exactly_as_one_lora(world_and_prediction, tmp_path):
    backbone, refs, net, predicted = world_and_prediction
    one = predicted.select(0)
    seen = {}
    out, seconds = fast_finetune(backbone, refs[0], "ball", one, steps=3, rank=2, lr=1e-2, callback=lambda step, w: seen.__setitem__(step, w))
    assert seconds > 0 and sorted(seen) == [0, 1, 2, 3]
    assert set(out.ranks.values()) == {1 + 2}  # rank r + r', nothing truncated
    start = seen[0].deltas()
    assert all(torch.allclose(start[n], one.deltas()[n], atol=1e-6) for n in start)  # B' = 0: it starts at the prediction
    moved = out.deltas()
    assert any(not torch.allclose(moved[n], start[n], atol=1e-5) for n in moved)
    assert all(torch.equal(moved[n], seen[3].deltas()[n]) for n in moved)  # what is returned is what was trained
    path = tmp_path / "subject.safetensors"
    save_lora(path, out, models={"unet": backbone.unet}, method="hyperdreambooth")
    loaded = load_lora(path, backbone.unet).unet
    assert set(loaded.ranks.values()) == {3}
    x = torch.randn(2, *backbone.sample_shape)
    t = torch.tensor([10, 500])
    cond = backbone.encode_prompts(["a sks ball", "a sks ball in the snow"])
    with torch.no_grad():
        with backbone.apply_lora(out, mode="shared"):
            trained = backbone.denoise(x, t, cond)
        with backbone.apply_lora(loaded, mode="shared"):
            exported = backbone.denoise(x, t, cond)
        with backbone.apply_lora(one, mode="shared"):
            before = backbone.denoise(x, t, cond)
    torch.testing.assert_close(exported, trained, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, trained, atol=1e-5)


def test_personalize_with_fast_finetune_keeps_its_clock(world_and_prediction):
    backbone, refs, net, predicted = world_and_prediction
    net.with_options(fast_finetune_steps=2, fast_finetune_rank=1)
    try:
        with pytest.raises(ConfigError, match="class name"):
            net.personalize(refs, backbone)
        weights = net.personalize(refs, backbone, class_names=["ball", "vase"])
        assert weights.num_subjects == 2 and set(weights.ranks.values()) == {2}
        assert net.seconds_per_subject > 0
    finally:
        net.with_options(fast_finetune_steps=0)
    again = net.personalize(refs, backbone)  # back to the hypernetwork alone
    assert all(torch.equal(again[n].B, predicted[n].B) for n in predicted)
