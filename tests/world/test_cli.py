import numpy as np
from PIL import Image

from hyperbooth.cli import main


def test_sample_writes_grid(tmp_path):
    out = tmp_path / "grid.png"
    assert main(["world", "sample", "--out", str(out), "--identities", "2", "--contexts", "plain,snow,red+beach", "--upscale", "2"]) == 0
    image = np.asarray(Image.open(out))
    assert image.shape == ((2 * 33 + 1) * 2, (3 * 33 + 1) * 2, 3)


def test_sample_bad_input(tmp_path, capsys):
    assert main(["world", "sample", "--out", str(tmp_path / "missing" / "g.png")]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["world", "sample", "--out", str(tmp_path / "g.png"), "--contexts", "moon"]) == 2
    assert "'moon'" in capsys.readouterr().err
    assert main(["world", "sample", "--out", str(tmp_path / "g.png"), "--resolution", "33"]) == 2
    assert "33" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
