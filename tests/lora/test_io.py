import json
import struct

import pytest
import torch
from safetensors import safe_open

from hyperbooth.errors import ConfigError, LoRAFileError
from hyperbooth.lora import (
    DEFAULT_TEXT_ENCODER_TARGETS,
    DEFAULT_UNET_TARGETS,
    LoRAWeights,
    apply_lora,
    load_lora,
    save_lora,
    target_shapes,
)
from hyperbooth.tiny import tiny_sd_pipeline, tiny_unet

TARGETS = DEFAULT_UNET_TARGETS + ("proj_in", "proj_out")


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(seed=0).requires_grad_(False)


def _lora(model, targets=TARGETS, rank=2, alpha=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return LoRAWeights.random(target_shapes(model, targets), rank=rank, alpha=alpha, std=0.2, generator=g)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([5, 500]), torch.randn(2, 6, 32, generator=g)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_round_trip_preserves_delta_and_metadata(unet, tmp_path, fmt):
    w = _lora(unet)
    path = save_lora(tmp_path / "s.safetensors", w, fmt, models={"unet": unet}, method="e2e", base_model="tiny-sd")
    loaded = load_lora(path, unet)
    assert loaded.format == fmt
    assert set(loaded.unet) == set(w)
    for name, d in w.deltas().items():
        torch.testing.assert_close(loaded.unet.deltas()[name], d, rtol=1e-5, atol=1e-7)
    meta = loaded.metadata
    assert meta["hyperbooth.method"] == "e2e" and meta["hyperbooth.base_model"] == "tiny-sd"
    assert meta["hyperbooth.rank"] == "2" and meta["hyperbooth.format_version"] == "1"
    assert float(meta["hyperbooth.alpha"]) in (2.0, 3.0)  # diffusers folds the scale: alpha = r
    # a file of our own resolves kohya names without a model
    assert set(load_lora(path).unet) == set(w)


def test_key_layouts_on_disk(unet, tmp_path):
    w = _lora(unet)
    save_lora(tmp_path / "d.safetensors", w, "diffusers", models={"unet": unet})
    save_lora(tmp_path / "k.safetensors", w, "kohya", models={"unet": unet})
    with safe_open(str(tmp_path / "d.safetensors"), "pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        proj_in = f.get_tensor("unet.down_blocks.0.attentions.0.proj_in.lora_A.weight")
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight" in keys
    assert proj_in.ndim == 4  # 1x1 conv saved 4-D, as PEFT expects
    assert meta["unet.r"] == 2 and meta["unet.lora_alpha"] == 2
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        keys = set(f.keys())
        alpha = f.get_tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha")
    assert "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in keys
    assert alpha.item() == 3.0


def test_text_encoder_component_round_trip(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    from hyperbooth.tiny import TINY_TEXT_CONFIG

    te = CLIPTextModel(CLIPTextConfig(vocab_size=100, **TINY_TEXT_CONFIG))
    unet = tiny_unet()
    both = {"unet": _lora(unet), "text_encoder": _lora(te, DEFAULT_TEXT_ENCODER_TARGETS, seed=1)}
    for fmt in ("diffusers", "kohya"):
        path = save_lora(tmp_path / f"{fmt}.safetensors", both, fmt)
        loaded = load_lora(path, {"unet": unet, "text_encoder": te})
        assert set(loaded.components) == {"unet", "text_encoder"}
        name = next(iter(both["text_encoder"]))
        torch.testing.assert_close(loaded.components["text_encoder"].deltas()[name], both["text_encoder"].deltas()[name])


def _real_client_check(tmp_path, fmt):
    """Our file, loaded by diffusers' own `pipe.load_lora_weights`, gives the UNet output of our runtime."""
    from diffusers import StableDiffusionPipeline

    folder = tiny_sd_pipeline(tmp_path / "tiny-sd")
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    unet = pipe.unet.requires_grad_(False)
    w = _lora(unet, alpha=3.0, seed=4)
    x_t, t, cond = _inputs()
    base = unet(x_t, t, encoder_hidden_states=cond).sample
    with apply_lora(unet, w, mode="shared"):
        ours = unet(x_t, t, encoder_hidden_states=cond).sample
    path = save_lora(tmp_path / "lora.safetensors", w, fmt, models={"unet": unet}, base_model=str(folder.name))
    pipe.load_lora_weights(str(path))
    with torch.no_grad():
        theirs = pipe.unet(x_t, t, encoder_hidden_states=cond).sample
    assert (ours - base).abs().max() > 1e-3
    assert (theirs - ours).abs().max().item() <= 1e-4


def test_real_client_diffusers_format(tmp_path):
    _real_client_check(tmp_path, "diffusers")


def test_real_client_kohya_format(tmp_path):
    _real_client_check(tmp_path, "kohya")


# -- bad input ------------------------------------------------------------------------------------------------


def test_refuses_pickles(tmp_path):
    for name in ("lora.bin", "lora.ckpt", "lora.pt"):
        path = tmp_path / name
        torch.save({"x": torch.zeros(1)}, path)
        with pytest.raises(LoRAFileError, match="pickle"):
            load_lora(path)
    disguised = tmp_path / "disguised.safetensors"
    torch.save({"x": torch.zeros(1)}, disguised)
    with pytest.raises(LoRAFileError, match="disguised.safetensors.*pickle"):
        load_lora(disguised)


def test_truncated_and_corrupt_files(unet, tmp_path):
    path = save_lora(tmp_path / "good.safetensors", _lora(unet), "kohya")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoRAFileError, match="truncated.safetensors"):
        load_lora(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 20)
    with pytest.raises(LoRAFileError, match="garbage.safetensors"):
        load_lora(garbage)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(LoRAFileError, match="empty.safetensors.*truncated or empty"):
        load_lora(empty)
    with pytest.raises(LoRAFileError, match="no such file"):
        load_lora(tmp_path / "absent.safetensors")


def test_mismatched_files_name_first_offending_key(unet, tmp_path):
    from safetensors.torch import save_file

    other = tiny_unet(cross_attention_dim=16)
    path = save_lora(tmp_path / "other.safetensors", _lora(other), "diffusers")
    with pytest.raises(LoRAFileError, match=r"other.safetensors.*attn2.to_k.*d_in=32.*d_in=16"):
        load_lora(path, unet)
    w = _lora(unet)
    save_file(
        {**{f"unet.{n}.lora_A.weight": l.A[0] for n, l in w.items()}, "unet.extra.something": torch.zeros(1)},
        str(tmp_path / "unknown.safetensors"),
    )
    with pytest.raises(LoRAFileError, match="unknown key 'unet.extra.something'"):
        load_lora(tmp_path / "unknown.safetensors")
    first = next(iter(w))
    save_file({f"unet.{first}.lora_A.weight": w[first].A[0]}, str(tmp_path / "half.safetensors"))
    with pytest.raises(LoRAFileError, match=f"unet.{first}.lora_B.weight' is missing"):
        load_lora(tmp_path / "half.safetensors")
    save_file({"lora_unet_nowhere_to_q.lora_down.weight": torch.zeros(1, 4), "lora_unet_nowhere_to_q.lora_up.weight": torch.zeros(4, 1)}, str(tmp_path / "k.safetensors"))
    with pytest.raises(LoRAFileError, match="lora_unet_nowhere_to_q"):
        load_lora(tmp_path / "k.safetensors", unet)
    partial = save_lora(tmp_path / "partial.safetensors", LoRAWeights({first: w[first]}), "diffusers")
    second = list(w)[1]
    with pytest.raises(LoRAFileError, match=f"target module '{second}'.*missing"):
        load_lora(partial, unet, require_targets={"unet": list(w)})


def test_save_errors_leave_nothing_behind(unet, tmp_path):
    w = _lora(unet)
    with pytest.raises(ConfigError, match="does not exist"):
        save_lora(tmp_path / "no" / "such" / "dir.safetensors", w)
    with pytest.raises(ConfigError, match="lora.pt'"):
        save_lora(tmp_path / "lora.pt", w)
    with pytest.raises(ConfigError, match="unknown LoRA format 'ckpt'"):
        save_lora(tmp_path / "x.safetensors", w, "ckpt")
    with pytest.raises(ConfigError, match="N=2"):
        save_lora(tmp_path / "x.safetensors", w.select([0, 0]))
    assert list(tmp_path.iterdir()) == []
