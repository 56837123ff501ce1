import math

import numpy as np
import pytest
import torch

from hyperbooth.demo import DemoRow, context_title, format_table, run_demo
from hyperbooth.world import contexts as ctx
from hyperbooth.backbones.world import WorldBackbone
from tests.test_generate import make_tiny_hypernet


@pytest.fixture(scope="module")
def tiny(tiny_world_model, tmp_path_factory):
    """The tiny base model, a tiny hypernetwork and randomly initialized oracles, as objects and as folders."""
    from hyperbooth.methods import load
    from hyperbooth.world.oracles import ContextClassifier, IdentityEncoder, OracleTrainConfig, Oracles, save_oracles

    root = tmp_path_factory.mktemp("demo_assets")
    base = WorldBackbone.from_pretrained(tiny_world_model)
    hn_dir = make_tiny_hypernet(base.unet, root / "hn")
    torch.manual_seed(0)
    oracles = Oracles(IdentityEncoder().eval(), ContextClassifier().eval())
    save_oracles(root / "oracles", oracles.identity, oracles.context, OracleTrainConfig(), {})
    return {"base": base, "hypernet": load(hn_dir), "oracles": oracles, "hn_dir": hn_dir, "oracles_dir": root / "oracles"}


def test_run_demo_writes_grid_and_returns_table(tiny, tmp_path):
    from PIL import Image

    contexts = (ctx.Context(background="snow"), ctx.Context(recolor="purple"), ctx.Context(accessory="red_hat"))
    rows, path = run_demo(tiny["base"], tiny["hypernet"], tiny["oracles"], tmp_path, identities=2, ref_counts=(1, 2), contexts=contexts, steps=2)
    assert [(r.refs, r.guidance) for r in rows] == [(0, "base cfg"), (1, "cfg"), (1, "hm-cfg"), (2, "cfg"), (2, "hm-cfg")]
    for r in rows:
        assert -1 <= r.subject_fidelity <= 1 and 0 <= r.prompt_fidelity <= 1 and r.seconds_per_image > 0
        assert 0 <= r.retrieval <= r.auc <= 1
        assert math.isnan(r.personalize_ms) if r.refs == 0 else r.personalize_ms > 0
    assert len({r.subject_fidelity for r in rows}) > 1  # personalization and guidance change the images
    assert path == tmp_path / "demo_grid.png" and sorted(p.name for p in tmp_path.iterdir()) == ["demo_grid.png"]
    grid = np.asarray(Image.open(path))
    cols = 2 + 3  # up to 2 reference columns, then 3 prompts
    assert grid.shape[1] == 4 + cols * (128 + 4)
    assert grid.shape[0] > 4 + 2 * 2 * 2 * (128 + 4)  # 2 identities x 2 reference counts x 2 guidances, with captions
    column = grid[:, 4 + 64]  # through the first reference column, below its title
    top = 20 + int(np.argmax((column[20:] != 255).any(-1)))  # the first row's reference cell starts here
    assert (grid[top : top + 128, 4 + 132 : 4 + 260] == 255).all()  # first row: 1 reference, the second cell blank


def test_format_table():
    rows = [DemoRow(0, "base cfg", 0.125, 0.5, 0.0, 0.25, 0.5, float("nan"), 0.1), DemoRow(3, "hm-cfg", 0.625, 0.9, 0.375, 0.75, 0.875, 12.34, 0.2)]
    lines = format_table(rows).splitlines()
    assert len(lines) == 4 and "retrieval top-1 of 8" in lines[0] and "same colour" in lines[0]
    assert lines[1].split() == ["-", "base", "cfg", "0.125", "0.500", "0.000", "0.250", "0.500", "-", "0.100"]
    assert lines[2].split() == ["3", "hm-cfg", "0.625", "0.900", "0.375", "0.750", "0.875", "12.3", "0.200"]
    assert lines[3].split() == ["chance", "0.125", "0.500", "0.125"]


def test_context_title():
    assert context_title(ctx.Context(background="snow")) == "a sks … in the snow"
    assert context_title(ctx.Context(recolor="purple", accessory="red_hat")) == "a purple sks … wearing a red hat"


def test_demo_cli_end_to_end(tiny, tiny_world_model, tmp_path, capsys):
    from hyperbooth.cli import main

    out = tmp_path / "demo"
    code = main(["demo", "--model", str(tiny_world_model), "--hypernet", str(tiny["hn_dir"]), "--oracles", str(tiny["oracles_dir"]), "--steps", "1", "--no-floor", "--no-interop", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "retrieval top-1 of 8" in printed and "hm-cfg" in printed and "base cfg" not in printed
    assert (out / "demo_grid.png").is_file()


@pytest.mark.parametrize(("which", "named"), [("hypernet", "does not exist"), ("oracles", "oracles.json"), ("model", "does not exist")])
def test_demo_missing_checkpoint_names_folder(tiny, tiny_world_model, tmp_path, capsys, which, named):
    """A missing folder: exit 2, one line naming the folder (and for the oracles the file and the fix), nothing written."""
    from hyperbooth.cli import main

    paths = {"model": str(tiny_world_model), "hypernet": str(tiny["hn_dir"]), "oracles": str(tiny["oracles_dir"])}
    paths[which] = str(tmp_path / "absent")
    args = [f"--{k}={v}" for k, v in paths.items()]
    assert main(["demo", *args, "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert named in err and str(tmp_path / "absent") in err and "\n" not in err.strip()
    if which == "oracles":
        assert "train" in err
    assert not (tmp_path / "demo").exists()
