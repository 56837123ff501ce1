import subprocess
import sys

import pytest
import torch

from hyperbooth.cli import main
from hyperbooth.lora import LoRAWeights, load_lora, save_lora


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "lora"):
        assert command in out


def test_console_script_help():
    """`python -m hyperbooth` (what `accelerate launch -m hyperbooth` runs) and the `hyperbooth` entry point."""
    result = subprocess.run([sys.executable, "-m", "hyperbooth", "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "demo" in result.stdout


def test_lora_inspect_and_convert(tmp_path, capsys):
    w = LoRAWeights.random({"mid.attn1.to_q": (8, 8)}, rank=2, alpha=4.0, generator=torch.Generator().manual_seed(0))
    made_by = {"hyperbooth.hypernet": "hypernet sha256:abc", "hyperbooth.backbone": "sd15"}
    src = save_lora(tmp_path / "a.safetensors", w, "kohya", method="e2e", base_model="sd15-folder", extra_metadata=made_by)
    assert main(["lora", "convert", str(src), str(tmp_path / "b.safetensors"), "--format", "diffusers"]) == 0
    converted = load_lora(tmp_path / "b.safetensors")
    assert converted.format == "diffusers" and converted.metadata["hyperbooth.method"] == "e2e"
    assert converted.metadata["hyperbooth.base_model"] == "sd15-folder"
    assert {k: converted.metadata[k] for k in made_by} == made_by  # the provenance travels with the file
    torch.testing.assert_close(converted.unet.deltas()["mid.attn1.to_q"], w.deltas()["mid.attn1.to_q"])
    capsys.readouterr()
    assert main(["lora", "inspect", str(tmp_path / "b.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "diffusers layout" in out and "hyperbooth.hypernet = hypernet sha256:abc" in out


def test_bad_file_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "weights.ckpt"
    bad.write_bytes(b"\x80\x04junk")
    assert main(["lora", "inspect", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "weights.ckpt" in err and "pickle" in err and "\n" not in err


def test_demo_runs_on_the_shipped_models_and_writes_loadable_files(tmp_path, capsys):
    """The quick start's main job end to end on the shipped world models (few sampling steps to stay fast)."""
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "kohya file via diffusers load_lora_weights" in out and "hm-cfg" in out
    assert (tmp_path / "demo" / "demo_grid.png").stat().st_size > 1000
    for fmt in ("diffusers", "kohya"):
        assert load_lora(tmp_path / "demo" / f"subject0_{fmt}.safetensors").format == fmt
