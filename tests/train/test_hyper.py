import csv
import shutil

import pytest
import torch

from hyperbooth.config import load_config
from hyperbooth.errors import CheckpointError, ConfigError
from hyperbooth.lora import load_lora, target_shapes
from hyperbooth.methods.e2e import E2EConfig, E2EHyperNetwork
from hyperbooth.train.hyper import HyperTrainConfig, train_hypernet

TINY = ["hypernet={d_model: 32, layers: 1, heads: 2, encoder_dim: 16, rank: 2}", "optim.batch_size=4", "optim.warmup_steps=1", "data.num_workers=0", "log_every=1", "checkpoint_every=2"]


def _cfg(model, out, *extra):
    return load_config(HyperTrainConfig, None, [*TINY, f"base_model={model}", f"out_dir={out}", *extra])


def _losses(out):
    with open(out / "log.csv") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


def test_decoder_output_is_zero_at_init():
    shapes = {"a.to_q": (8, 8), "a.to_k": (12, 8), "b.to_q": (8, 8)}
    net = E2EHyperNetwork(E2EConfig(d_model=32, layers=1, heads=2, encoder_dim=16), shapes)
    w = net(torch.rand(3, 2, 3, 32, 32) * 2 - 1)
    assert w.num_subjects == 3 and set(w) == set(shapes)
    assert all(torch.count_nonzero(d) == 0 for d in w.deltas().values())
    assert all(layer.A.abs().sum() > 0 for layer in w.values())  # gradients can reach B through A


def test_save_pretrained_in_fp16_halves_the_file_and_loads_back(tmp_path):
    shapes = {"a.to_q": (8, 8), "a.to_k": (12, 8)}
    torch.manual_seed(0)
    net = E2EHyperNetwork(E2EConfig(d_model=32, layers=1, heads=2, encoder_dim=16), shapes)
    for head in net.head_B.values():
        torch.nn.init.normal_(head.weight, std=0.2)
    full, half = net.save_pretrained(tmp_path / "fp32"), net.save_pretrained(tmp_path / "fp16", dtype=torch.float16)
    size = lambda folder: (folder / "hypernet.safetensors").stat().st_size  # noqa: E731
    assert size(half) < 0.6 * size(full)
    loaded = E2EHyperNetwork.from_pretrained(half)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    refs = torch.rand(2, 1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        a, b = net.eval()(refs).deltas(), loaded(refs).deltas()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-2, atol=1e-3)
    with torch.no_grad():
        next(iter(net.head_B.values())).weight[0, 0] = 1e6  # beyond fp16's range
    with pytest.raises(CheckpointError, match="overflow"):
        net.save_pretrained(tmp_path / "overflow", dtype=torch.float16)
    assert not (tmp_path / "overflow").exists()  # nothing half-written


def test_three_steps_checkpoint_and_exact_resume(tiny_world_model, tmp_path):
    full = train_hypernet(_cfg(tiny_world_model, tmp_path / "full", "optim.max_steps=3"))
    part = tmp_path / "part"
    train_hypernet(_cfg(tiny_world_model, part, "optim.max_steps=3"))
    shutil.rmtree(part / "checkpoints" / "step-0000003")
    (part / "checkpoints" / "latest").write_text("step-0000002")
    resumed = train_hypernet(_cfg(tiny_world_model, part, "optim.max_steps=3"), resume=True)
    assert _losses(part)[3] == _losses(tmp_path / "full")[3]
    a, b = E2EHyperNetwork.from_pretrained(full).state_dict(), E2EHyperNetwork.from_pretrained(resumed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "full")[1] > 0


def test_lambda_zero_and_reg_logged(tiny_world_model, tmp_path):
    train_hypernet(_cfg(tiny_world_model, tmp_path, "optim.max_steps=2", "output_reg=0", "data.mode=same"))
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["reg"]) > 0  # ΔW left zero after the first update


def test_save_dtype_fp16_stores_the_final_folder_in_half_and_checkpoints_in_full(tiny_world_model, tmp_path):
    from safetensors import safe_open

    final = train_hypernet(_cfg(tiny_world_model, tmp_path, "optim.max_steps=2", "save_dtype=fp16"))

    def dtypes(folder):
        with safe_open(str(folder / "hypernet.safetensors"), "pt") as f:
            return {f.get_slice(k).get_dtype() for k in f.keys()}

    assert dtypes(final) == {"F16"}
    assert dtypes(tmp_path / "checkpoints" / "step-0000002" / "hypernet") == {"F32"}
    assert all(p.dtype == torch.float32 for p in E2EHyperNetwork.from_pretrained(final).parameters())
    with pytest.raises(ConfigError, match="save_dtype='bf8'"):
        _cfg(tiny_world_model, tmp_path, "save_dtype=bf8")


def test_personalize_writes_a_file_both_loaders_read(tiny_world_model, tmp_path):
    from diffusers import UNet2DConditionModel
    from PIL import Image

    from hyperbooth.cli import main

    hypernet = train_hypernet(_cfg(tiny_world_model, tmp_path / "run", "optim.max_steps=2"))
    img = tmp_path / "ref.png"
    Image.new("RGB", (48, 40), (200, 30, 30)).save(img)
    out = tmp_path / "subject.safetensors"
    assert main(["personalize", "--images", str(img), "--out", str(out), "--hypernet", str(hypernet), "--model", str(tiny_world_model)]) == 0
    unet = UNet2DConditionModel.from_pretrained(tiny_world_model, subfolder="unet")
    lora = load_lora(out, unet)
    assert set(lora.unet) == set(target_shapes(unet))
    unet.load_lora_adapter(str(out), prefix="unet")  # diffusers' own loader
    assert any("lora" in name for name, _ in unet.named_modules())


def test_bad_inputs_are_named(tiny_world_model, tmp_path, capsys):
    from hyperbooth.cli import main

    with pytest.raises(ConfigError, match="optim.nope"):
        _cfg(tiny_world_model, tmp_path, "optim.nope=1")
    with pytest.raises(ConfigError, match="method='hyperlora'"):
        _cfg(tiny_world_model, tmp_path, "method=hyperlora")
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    code = main(["personalize", "--images", str(bad), "--out", str(tmp_path / "x.safetensors"), "--hypernet", str(tmp_path), "--model", str(tiny_world_model)])
    assert code == 2 and "hypernet_config.json" in capsys.readouterr().err
    folder = tmp_path / "base_as_hypernet"
    shutil.copytree(tiny_world_model, folder)
    (folder / "hypernet_config.json").write_text('{"method": "hyperdreambooth"}')
    with pytest.raises(CheckpointError, match="'hyperdreambooth' hypernetwork"):
        E2EHyperNetwork.from_pretrained(folder)
    assert not (tmp_path / "x.safetensors").exists()


def test_two_processes_give_the_same_update_as_one(tiny_world_model, tmp_path):
    """`accelerate launch --num_processes 2 --cpu` with global batch 4 = one process with batch 4."""
    import os
    import subprocess
    import sys

    args = [*TINY, f"base_model={tiny_world_model}", "optim.max_steps=1", "checkpoint_every=1"]
    one = train_hypernet(load_config(HyperTrainConfig, None, [*args, f"out_dir={tmp_path / 'one'}"]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "hyperbooth", "train", *args, f"out_dir={tmp_path / 'two'}"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    a = E2EHyperNetwork.from_pretrained(one).state_dict()
    b = E2EHyperNetwork.from_pretrained(tmp_path / "two" / "hypernet").state_dict()
    init = E2EHyperNetwork(E2EHyperNetwork.from_pretrained(one).config, E2EHyperNetwork.from_pretrained(one).target_shapes)
    moved = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved < 1e-5
    assert any(not torch.equal(a[k], init.state_dict()[k]) for k in a if k.startswith("head_B"))  # it did update
