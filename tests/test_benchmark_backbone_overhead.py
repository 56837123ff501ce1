"""``benchmarks/backbone_overhead.py`` on the tiny SDXL / SD3 / CLIP configs (``--tiny``): its three tables have the
expected rows, its self-checks pass (every LoRA acts, merged and per-sample agree, HM-CFG's base rows carry no LoRA),
and its in-place merge is undone on exit. Timings themselves are never asserted."""


import pytest
import torch

from tests.conftest import benchmark_module


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("backbone_overhead") as module:
        yield module


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    """The cells of every Markdown table row whose first cell is ``first_cell``."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells[0] == first_cell:
                rows.append(cells)
    return rows


def test_tiny_run_prints_the_three_tables(bench, capsys):
    torch_threads = torch.get_num_threads()
    try:
        results = bench.main(["--tiny", "--rounds", "1", "--encoder-rounds", "1", "--batches", "1", "2", "--subjects", "1", "2"])
    finally:
        torch.set_num_threads(torch_threads)
    out = capsys.readouterr().out
    assert "1 thread" in out and "TINY configs" in out
    for name in ("SDXL UNet (tiny)", "SD3-medium transformer (tiny)"):
        rows = table_rows(out, name)
        overhead = [r for r in rows if len(r) == 10]
        assert [(r[5], r[6]) for r in overhead] == [(n, m) for n in ("1", "2") for m in ("none", "merged", "per-sample")]
        assert all(r[8].endswith("x") for r in overhead) and [r[8] for r in overhead if r[6] == "none"] == ["1.000x", "1.000x"]
        hm = [r for r in rows if len(r) == 6]
        steps = [bench.CFG_MERGED, bench.CFG_PER_SAMPLE, bench.HM_ONE_CALL, bench.BARE_3N]
        assert [(r[1], r[2]) for r in hm] == [(n, s) for n in ("1", "2") for s in steps]
        assert [r[4] for r in hm if r[2] == bench.CFG_MERGED] == ["1.000x", "1.000x"]  # the first ratio column's baseline
        assert [r[5] for r in hm if r[2] == bench.CFG_PER_SAMPLE] == ["1.000x", "1.000x"]
        personalize = [r for r in rows if len(r) == 4]
        assert [r[1] for r in personalize] == ["image encoder forward", "images → LoRAWeights (encoder + decoder)"]
        assert personalize[0][3] == "1.000x"
    for goal in ("goals: merged <= 1.02x", "goal: HM-CFG in one call <= 1.35x", "goal: personalization <= 2x"):
        assert goal in out
    assert set(results["overhead"]) == set(results["hm"]) == set(results["personalize"]) == {"sdxl", "sd3"}


def test_merged_in_place_is_undone_on_exit(bench):
    from hyperbooth.lora import DEFAULT_UNET_TARGETS, LoRAWeights, target_shapes
    from hyperbooth.tiny import tiny_unet

    unet = tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    lora = LoRAWeights.random(target_shapes(unet, DEFAULT_UNET_TARGETS), rank=4, std=0.1, generator=torch.Generator().manual_seed(0))
    name = next(iter(lora)) + ".weight"
    with bench.merged_in_place(unet, lora):
        assert not torch.equal(unet.state_dict()[name], before[name])
    for key, value in unet.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6)


def test_ratio_is_the_median_of_paired_rounds(bench):
    times = {"base": [2.0, 2.0, 4.0], "other": [1.0, 4.0, 6.0]}
    assert bench.median_ratio(times, "other", "base") == pytest.approx(1.5)  # rounds: 0.5, 2.0, 1.5
