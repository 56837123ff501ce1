"""``benchmarks/interpolation.py``: the endpoints of a mixture are the subjects themselves (a HyperLoRA mixes in its
coefficient space, other methods in ΔW), its progress column runs from 0 at A to 1 at B, and the table has a row
per method and α beside the base model's. Figures themselves are never asserted."""

import torch

from hyperbooth.backbones import load_backbone
from hyperbooth.methods import SHIPPED_E2E, load
from hyperbooth.methods.hyperlora import HyperLoRA, HyperLoRAConfig
from hyperbooth.world.fidelity import reference_images
from tests.conftest import benchmark_module


def _hyperlora(backbone, folder):
    net = HyperLoRA.for_backbone(HyperLoRAConfig(rank=2, num_basis=4, d_model=32, depth=1, heads=2, id_tokens=2), backbone)
    with torch.no_grad():
        for up in [*net.id_basis.up, *net.base_basis.up]:
            up.normal_(std=0.05)
    net.stage_reached.fill_(1)
    return net.save_pretrained(folder)


def test_mixture_ends_are_the_subjects_and_the_table_runs(tmp_path, capsys):
    backbone = load_backbone(None)
    folder = _hyperlora(backbone, tmp_path / "hl")
    with benchmark_module("interpolation") as bench:
        (a, b), = bench.same_class_pairs(1)
        ref_a, ref_b = (reference_images(s, 1)[0] for s in (a, b))
        for personalizer in (load(folder).eval(), load(SHIPPED_E2E).eval()):
            ends = bench.endpoints(personalizer, ref_a, ref_b, backbone)
            with torch.no_grad():
                own_a, own_b = (personalizer.personalize(r[None], backbone) for r in (ref_a, ref_b))
            for alpha, own in ((0.0, own_a), (1.0, own_b)):
                mixed, own = bench.mixture(personalizer, ends, alpha).deltas(), own.deltas()
                assert all(torch.allclose(mixed[n], own[n], atol=1e-6) for n in own)
        assert bench.main(["--hypernet", str(folder), "--label", "hl", "--hypernet", str(SHIPPED_E2E), "--label", "e2e", "--pairs", "1", "--alphas", "0,1",
                           "--steps", "1", "--json", str(tmp_path / "i.json")]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert table[1].startswith("| base model (no LoRA) |") and len(table) == 2 + 2 * 2  # the header, the base model, 2 x 2 rows
    assert table[2].startswith("| hl | 0.00 |") and table[2].split("|")[6].strip() == "0.00" and table[3].split("|")[6].strip() == "1.00"
