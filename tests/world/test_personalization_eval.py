import json
import math

import pytest
import torch
from PIL import Image

from hyperbooth.cli import main
from hyperbooth.errors import CheckpointError, ConfigError
from hyperbooth.lora import target_shapes
from hyperbooth.methods.e2e import E2EConfig, E2EHyperNetwork
from hyperbooth.world import contexts as ctx
from hyperbooth.world.comparison import compare_hm_cfg
from hyperbooth.world.contexts import CONTEXT_TYPES
from hyperbooth.world.fidelity import reference_images
from hyperbooth.world.identity import describe, make_identity
from hyperbooth.world.merge import merge_results
from hyperbooth.world.personalization import evaluate_personalization, generate_row, load_personalizers, multi_reference_variants
from hyperbooth.world.protocol import RowSpec, hm_cfg_pairs, personalization_items, personalization_rows
from hyperbooth.world.report import comparison_table, personalization_table, plot_fidelity
from hyperbooth.backbones.world import WorldBackbone
from hyperbooth.world.oracles import AttributeClassifier, ContextClassifier, IdentityEncoder, OracleTrainConfig, Oracles, save_oracles
from hyperbooth.world.splits import identity_seeds


@pytest.fixture(scope="module")
def base(tiny_world_model):
    return WorldBackbone.from_pretrained(tiny_world_model)


@pytest.fixture(scope="module")
def hypernet_dir(base, tmp_path_factory):
    """A tiny e2e hypernetwork whose LoRA is not zero (head_B starts at zero; give it weights)."""
    torch.manual_seed(0)
    hypernet = E2EHyperNetwork(E2EConfig(d_model=32, layers=1, heads=2), target_shapes(base.unet))
    for head in hypernet.head_B.values():
        torch.nn.init.normal_(head.weight, std=0.2)
    return hypernet.save_pretrained(tmp_path_factory.mktemp("hypernet") / "hypernet")


@pytest.fixture(scope="module")
def oracles_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("oracles")
    return save_oracles(folder, IdentityEncoder(), ContextClassifier(), OracleTrainConfig(), {}, AttributeClassifier())


@pytest.fixture(scope="module")
def oracles(oracles_dir):
    return Oracles.load(oracles_dir)


def test_items_cover_every_context_type_deterministically():
    seeds = list(identity_seeds("test", 4))
    items = personalization_items(seeds, 6)
    assert items == personalization_items(seeds, 6) and len(items) == 24
    assert {it.context.background for it in items} == {None, *ctx.BACKGROUNDS}
    assert {it.context.recolor for it in items} == {None, *ctx.RECOLOR_WORDS}
    assert {it.context.accessory for it in items} == {None, *ctx.ACCESSORY_PHRASES}
    for i, seed in enumerate(seeds):
        own = items[6 * i : 6 * i + 6]
        assert {it.identity_seed for it in own} == {seed} and {it.subject for it in own} == {i}
        assert {t for it in own for t in it.types} == set(CONTEXT_TYPES)
        assert {it.context.recolor for it in own} == {None, "red", "purple"}  # each identity shown red and purple
        assert any(len(it.types) > 1 for it in own)  # combos
    it = items[4]  # recolour + background
    assert it.prompt("sks").startswith(f"a {it.context.recolor} sks {it.class_name}") and "sks" not in it.prompt(None)
    color, details = describe(make_identity(it.identity_seed))
    described = it.prompt(None, described=True)
    assert described.startswith(f"a {it.context.recolor} {it.class_name}")  # the recolour, not the subject's own colour
    assert details in described if details else described == it.prompt(None)
    plain = items[0]  # no recolour: the subject's own colour word
    assert plain.prompt(None, described=True).startswith(f"a {describe(make_identity(plain.identity_seed))[0]} {plain.class_name}")
    with pytest.raises(ConfigError, match="prompts_per_identity=0"):
        personalization_items(seeds, 0)


def test_rows_and_weight_pairs():
    assert hm_cfg_pairs([1, 2], [0.5, 1], sweep=True) == [(1, 0.5), (1, 1), (2, 0.5), (2, 1)]
    assert hm_cfg_pairs([1, 2], [0.5, 1]) == [(1, 0.5), (2, 1)]
    assert hm_cfg_pairs([3], [0, 1]) == [(3, 0), (3, 1)]
    rows = personalization_rows(["e2e", "λ=0"], refs=[1, 3], guidance_scales=[2, 3], hm_pairs=[(3, 1)])
    labels = [r.label for r in rows]
    assert labels[:2] == ["floor cfg g=2", "floor cfg g=3"]
    assert labels[2:5] == ["e2e cfg g=2", "e2e cfg g=3", "e2e hm-cfg w_base=3 w_pers=1"]
    assert "λ=0 k=3 hm-cfg w_base=3 w_pers=1" in labels and len(rows) == 2 + 2 * 2 * 3
    assert rows[0].token is None and rows[2].token == ctx.RARE_TOKEN
    assert RowSpec("hm-cfg", "e2e", class_prompt=True).token is None
    for bad, match in (([1, "x"], "'x'"), ([1, float("nan")], "nan"), ([-1], "-1"), ([], "at least one")):
        with pytest.raises(ConfigError, match=match):
            hm_cfg_pairs(bad, [1.0])
    with pytest.raises(ConfigError, match="differ in length"):
        hm_cfg_pairs([1, 2], [1, 2, 3])
    with pytest.raises(ConfigError, match="'cfg' row needs"):
        RowSpec("cfg")
    with pytest.raises(ConfigError, match="'pag'"):
        RowSpec("pag")
    with pytest.raises(ConfigError, match="refs=0"):
        RowSpec("cfg", "e2e", refs=0)
    words = personalization_rows(["e2e"], guidance_scales=[2, 3], hm_pairs=[(2, 2)], described=True)
    assert [r.label for r in words][:4] == ["floor cfg g=2", "floor cfg g=3", "described in words cfg g=2", "described in words cfg g=3"]
    assert not words[2].personalized and words[2].described and words[2].token is None and not words[0].described
    timed = personalization_rows(["e2e"], guidance_scales=[3], hm_pairs=[(2, 2)], pers_intervals=[(0, 1), (0.5, 1)])
    assert [r.label for r in timed][2:] == ["e2e hm-cfg w_base=2 w_pers=2", "e2e hm-cfg w_base=2 w_pers=2 t/T in [0.5,1]"]
    with pytest.raises(ConfigError, match="pers_interval"):
        RowSpec("hm-cfg", "e2e", pers_interval=(1.0, 0.5))


def test_hm_cfg_with_w_pers_zero_is_the_floor(base, hypernet_dir):
    hypernet = E2EHyperNetwork.from_pretrained(hypernet_dir)
    seeds = list(identity_seeds("test", 2))
    items = personalization_items(seeds, 2)
    refs = torch.stack([reference_images(s, 1) for s in seeds])
    weights = hypernet(refs)
    kw = dict(steps=2, batch_size=3)  # 4 items in chunks of 3 and 1
    floor = generate_row(base, RowSpec("floor", guidance_scale=3.0), items, None, **kw)
    hm0 = generate_row(base, RowSpec("hm-cfg", "e2e", w_base=3.0, w_pers=0.0, class_prompt=True), items, weights, **kw)
    assert floor.shape == (4, 3, 32, 32)
    torch.testing.assert_close(hm0, floor, rtol=1e-4, atol=1e-5)
    cfg = generate_row(base, RowSpec("cfg", "e2e", guidance_scale=3.0, class_prompt=True), items, weights, **kw)
    assert (cfg - floor).abs().max() > 1e-3  # the predicted LoRA changes the images


def test_evaluate_personalization_table(base, oracles, hypernet_dir):
    hypernets = load_personalizers([hypernet_dir], base=base)
    rows = personalization_rows(list(hypernets), refs=[2], guidance_scales=[3.0], hm_pairs=[(3.0, 1.0)])
    result = evaluate_personalization(base, oracles, hypernets, rows, num_identities=2, prompts_per_identity=3, steps=2)
    labels = [r["label"] for r in result["rows"]]
    assert labels == ["references (renders, k=2)", "floor cfg g=3", "e2e k=2 cfg g=3", "e2e k=2 hm-cfg w_base=3 w_pers=1"]
    for row in result["rows"]:
        assert -1 <= row["subject"] <= 1 and 0 <= row["retrieval"] <= 1 and 0 <= row["auc"] <= 1
        assert row["retrieval"] <= row["auc"] + 1e-9  # a top-1 image beats all 7 others: its AUC is 1
        if row["kind"] == "references":
            continue
        assert row["images"] == 6
        for key in ("retrieval", "auc", "retrieval_same_color", "subject", "prompt", "prompt_class", "prompt_background", "prompt_recolor", "retrieval_recolor",
                    "subject_recolor", "prompt_recolor", "attr_pattern", "attr_shape", "seconds_per_image"):
            assert math.isfinite(row[key]), (row["label"], key)
        assert math.isnan(row["prompt_accessory"])  # 3 prompts per identity: plain, background, recolour
        assert math.isfinite(row["hypernet_ms_per_subject"]) == (row["kind"] != "floor")
    [comparison] = result["comparison"]
    assert comparison["hm_cfg"] == "e2e k=2 hm-cfg w_base=3 w_pers=1" and comparison["cfg"] == "e2e k=2 cfg g=3"
    table = personalization_table(result)
    assert all(f"| {label} |" in table for label in labels) and "nan" not in table
    assert table.splitlines()[-1].startswith("| *chance* | 0.125 | – | 0.500 | 0.125 | 0.100 | 0.091 | 0.167 | 0.200 |")
    again = evaluate_personalization(base, oracles, hypernets, rows[:1], num_identities=2, prompts_per_identity=3, steps=2)
    assert again["rows"][1]["subject"] == result["rows"][1]["subject"]  # seeded


def test_evaluate_personalization_bad_input(base, oracles, hypernet_dir, tmp_path):
    hypernets = load_personalizers([hypernet_dir])
    with pytest.raises(ConfigError, match="num_identities=0"):
        evaluate_personalization(base, oracles, hypernets, num_identities=0)
    with pytest.raises(ConfigError, match="'other'"):
        evaluate_personalization(base, oracles, hypernets, [RowSpec("cfg", "other")], num_identities=1)
    with pytest.raises(ConfigError, match="'euler_x'"):
        evaluate_personalization(base, oracles, hypernets, scheduler="euler_x", num_identities=1)
    with pytest.raises(CheckpointError, match="nowhere"):
        load_personalizers([tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty"):
        load_personalizers([tmp_path / "empty"])
    with pytest.raises(ConfigError, match="distinct"):
        load_personalizers([hypernet_dir, hypernet_dir], ["a", "a"])
    other = E2EHyperNetwork(E2EConfig(d_model=32, layers=1, heads=2), {"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (8, 8)})
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(CheckpointError, match="other"):
        load_personalizers([tmp_path / "other"], base=base)


def _row(kind, label, retrieval, prompt, recolor, hypernet="e2e", refs=1, g=3.0, w=(3.0, 1.0)):
    return {
        "kind": kind, "label": label, "hypernet": hypernet, "refs": refs, "retrieval": retrieval, "subject": 0.0, "prompt": prompt, "prompt_recolor": recolor,
        "guidance_scale": g if kind in ("floor", "cfg") else None, "w_base": w[0] if kind == "hm-cfg" else None, "w_pers": w[1] if kind == "hm-cfg" else None,
    }


def test_compare_hm_cfg_on_hand_made_rows(tmp_path):
    rows = [
        {**_row("references", "references", 0.9, float("nan"), float("nan")), "hypernet": None},
        {**_row("floor", "floor cfg g=3", 0.2, 0.8, 0.7), "hypernet": None},
        _row("cfg", "e2e cfg g=2", 0.50, 0.40, 0.30, g=2.0),
        _row("cfg", "e2e cfg g=4", 0.60, 0.30, 0.20, g=4.0),
        _row("hm-cfg", "hm a", 0.59, 0.45, 0.50, w=(3.0, 1.0)),  # nearest g=4, within 0.02, better
        _row("hm-cfg", "hm f", 0.575, 0.50, 0.50, w=(4.0, 1.0)),  # nearest g=4, 0.025 away: matched at the default 0.03 only
        _row("hm-cfg", "hm b", 0.515, 0.35, 0.20, w=(3.0, 0.5)),  # nearest g=2, within, worse
        _row("hm-cfg", "hm c", 0.70, 0.90, 0.90, w=(1.0, 2.0)),  # nearest g=4, 0.10 away
        _row("hm-cfg", "hm d", 0.50, 0.90, 0.90, hypernet="other"),  # no CFG row of its hypernet
        _row("hm-cfg", "hm e", 0.50, 0.90, 0.90, refs=3),  # nor of its reference count
    ]
    assert {c["hm_cfg"]: c["matched"] for c in compare_hm_cfg(rows)}["hm f"]  # DEFAULT_TOLERANCE = 0.03
    rows = [r for r in rows if r["label"] != "hm f"]
    out = {c["hm_cfg"]: c for c in compare_hm_cfg(rows, tolerance=0.02)}
    assert list(out) == ["hm a", "hm b", "hm c", "hm d", "hm e"]
    a = out["hm a"]
    assert a["cfg"] == "e2e cfg g=4" and a["matched"] and a["better"]
    assert a["retrieval_gap"] == pytest.approx(-0.01) and a["prompt_gain"] == pytest.approx(0.15) and a["recolor_prompt_gain"] == pytest.approx(0.30)
    assert out["hm b"]["cfg"] == "e2e cfg g=2" and out["hm b"]["matched"] and not out["hm b"]["better"]
    assert out["hm b"]["prompt_gain"] == pytest.approx(-0.05)
    assert out["hm c"]["cfg"] == "e2e cfg g=4" and not out["hm c"]["matched"] and not out["hm c"]["better"]
    assert out["hm d"]["cfg"] is None and out["hm e"]["cfg"] is None
    text = comparison_table(list(out.values()), 0.02)
    assert "1 of 2 matched" in text and "3 of 5 HM-CFG rows had no CFG row" in text
    assert compare_hm_cfg(rows, tolerance=0.2)[2]["matched"]
    with pytest.raises(ConfigError, match="tolerance"):
        compare_hm_cfg(rows, tolerance=-1)

    assert plot_fidelity(rows, tmp_path / "sweep.png") == tmp_path / "sweep.png"
    assert Image.open(tmp_path / "sweep.png").size == (720, 540)
    with pytest.raises(ConfigError, match="plot"):
        plot_fidelity(rows[:1], tmp_path / "none.png")


def test_cli_sweep_writes_table_json_and_plot(tiny_world_model, oracles_dir, hypernet_dir, tmp_path, capsys):
    out_json, out_png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    args = [
        "world", "eval-personalization", "--model", str(tiny_world_model), "--oracles", str(oracles_dir),
        "--hypernet", str(hypernet_dir), "--num-identities", "2", "--prompts", "2", "--steps", "2",
        "--sweep", "--w-base", "1,3", "--w-pers", "1", "--guidance-scales", "3",
        "--json", str(out_json), "--plot", str(out_png),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    for label in ("floor cfg g=3", "described in words cfg g=3", "e2e cfg g=3", "e2e hm-cfg w_base=1 w_pers=1", "e2e hm-cfg w_base=3 w_pers=1"):
        assert f"| {label} |" in printed
    assert "At equal retrieval top-1" in printed and "min" in printed
    result = json.loads(out_json.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert len(result["rows"]) == 1 + 2 + 1 + 2 and len(result["comparison"]) == 2
    assert result["settings"]["images_per_row"] == 4
    assert Image.open(out_png).format == "PNG"


def test_multi_reference_variants_share_weights_and_differ_only_for_several_refs(hypernet_dir):
    hypernet = E2EHyperNetwork.from_pretrained(hypernet_dir)
    variants = multi_reference_variants({"e2e": hypernet}, ["tokens", "mean_delta", "tokens"])
    assert list(variants) == ["e2e:tokens", "e2e:mean_delta"]
    assert hypernet.config.multi_reference == "tokens"  # the original is untouched
    assert variants["e2e:mean_delta"].head_B is hypernet.head_B
    torch.manual_seed(1)
    one, three = torch.rand(2, 1, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        a, b = variants["e2e:tokens"](one), variants["e2e:mean_delta"](one)
        name = next(iter(a))
        torch.testing.assert_close(a[name].delta(), b[name].delta())  # k = 1: the same LoRA
        a, b = variants["e2e:tokens"](three), variants["e2e:mean_delta"](three)
        assert b[name].A.shape[-2] == 3 * a[name].A.shape[-2]  # mean_delta: rank k·r
        assert not torch.allclose(a[name].delta(), b[name].delta())
    with pytest.raises(ConfigError, match="'median'"):
        multi_reference_variants({"e2e": hypernet}, ["median"])


def test_cli_multi_reference_rows(tiny_world_model, oracles_dir, hypernet_dir, capsys):
    args = [
        "world", "eval-personalization", "--model", str(tiny_world_model), "--oracles", str(oracles_dir),
        "--hypernet", str(hypernet_dir), "--num-identities", "1", "--prompts", "1", "--steps", "1",
        "--refs", "3", "--multi-reference", "tokens,mean_delta",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| e2e:tokens k=3 cfg g=3 |" in printed and "| e2e:mean_delta k=3 cfg g=3 |" in printed


def test_cli_dreambooth_rows_fine_tune_once_and_reuse_the_cache(tiny_world_model, oracles_dir, hypernet_dir, tmp_path, capsys):
    cache = tmp_path / "db"
    args = [
        "world", "eval-personalization", "--model", str(tiny_world_model), "--oracles", str(oracles_dir),
        "--hypernet", str(hypernet_dir), "--num-identities", "2", "--prompts", "1", "--steps", "1",
        "--dreambooth-steps", "2", "--dreambooth-cache", str(cache), "--json",
    ]
    assert main([*args, str(tmp_path / "a.json")]) == 0
    assert "| dreambooth-lora-2 cfg g=3 |" in capsys.readouterr().out
    files = sorted(cache.glob("dreambooth-*.safetensors"))
    assert len(files) == 2  # one LoRA per identity
    stamps = [f.stat().st_mtime_ns for f in files]
    assert main([*args, str(tmp_path / "b.json")]) == 0
    assert [f.stat().st_mtime_ns for f in sorted(cache.glob("*.safetensors"))] == stamps  # reused, not fine-tuned again
    rows = [{r["label"]: r for r in json.loads((tmp_path / n).read_text())["rows"]} for n in ("a.json", "b.json")]
    db = "dreambooth-lora-2 cfg g=3"
    assert rows[0][db]["subject"] == rows[1][db]["subject"] and rows[0][db]["hypernet_ms_per_subject"] > 0
    assert rows[0][db]["hypernet_ms_per_subject"] == pytest.approx(rows[1][db]["hypernet_ms_per_subject"], rel=1e-3)


def test_merge_results_keeps_chosen_hypernetworks_and_names_differing_figures():
    settings = {"num_identities": 2, "prompts_per_identity": 2, "steps": 2, "seed": 0, "scheduler": "dpm++", "identity_seeds": [1, 2]}
    first = {"settings": settings, "rows": [
        {**_row("floor", "floor cfg g=3", 0.2, 0.8, 0.7), "hypernet": None},
        _row("cfg", "a cfg g=3", 0.5, 0.6, 0.5, hypernet="a"),
        _row("cfg", "b cfg g=3", 0.4, 0.7, 0.6, hypernet="b"),
    ]}
    second = {"settings": {**settings, "hypernet_folders": {"b": "runs/b"}}, "rows": [
        _row("hm-cfg", "b hm", 0.41, 0.9, 0.9, hypernet="b", w=(2.0, 2.0)),
        _row("hm-cfg", "a hm", 0.51, 0.9, 0.9, hypernet="a", w=(2.0, 2.0)),
    ]}
    merged = merge_results([("first", first), ("second", second)], keep=["b"])
    assert [r["label"] for r in merged["rows"]] == ["floor cfg g=3", "b cfg g=3", "b hm"]
    assert [c["hm_cfg"] for c in merged["comparison"]] == ["b hm"] and merged["comparison"][0]["matched"]
    everything = merge_results([("first", first), ("second", second)])
    assert [r["label"] for r in everything["rows"]] == ["floor cfg g=3", "a cfg g=3", "a hm", "b cfg g=3", "b hm"]
    changed = {"settings": settings, "rows": [_row("cfg", "a cfg g=3", 0.5, 0.65, 0.5, hypernet="a")]}
    with pytest.raises(ConfigError, match=r"prompt 0\.65 vs 0\.6"):
        merge_results([("first", first), ("changed", changed)])


def test_cli_merge_evals_joins_runs_of_one_protocol(tiny_world_model, oracles_dir, hypernet_dir, tmp_path, capsys):
    common = [
        "world", "eval-personalization", "--model", str(tiny_world_model), "--oracles", str(oracles_dir),
        "--hypernet", str(hypernet_dir), "--num-identities", "2", "--prompts", "2", "--steps", "2",
    ]
    assert main(common + ["--w-base", "3", "--w-pers", "1", "--json", str(tmp_path / "a.json")]) == 0
    assert main(common + ["--w-base", "2", "--w-pers", "2", "--kinds", "hm-cfg", "--json", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert list(a["settings"]["hypernet_folders"]) == ["e2e"]
    folder, digest = a["settings"]["hypernet_folders"]["e2e"].rsplit(" sha256:", 1)
    assert folder == str(hypernet_dir.resolve()) and len(digest) == 16
    capsys.readouterr()

    merged_path, plot = tmp_path / "merged.json", tmp_path / "merged.png"
    assert main(["world", "merge-evals", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--json", str(merged_path), "--plot", str(plot)]) == 0
    printed = capsys.readouterr().out
    merged = json.loads(merged_path.read_text())
    labels = [r["label"] for r in merged["rows"]]
    # the shared rows (references, floor, e2e CFG: same seeds, same figures) once; both HM-CFG rows, w_base descending
    assert labels == [r["label"] for r in a["rows"] if r["kind"] != "hm-cfg"] + ["e2e hm-cfg w_base=3 w_pers=1", "e2e hm-cfg w_base=2 w_pers=2"]
    assert [c["hm_cfg"] for c in merged["comparison"]] == labels[-2:]
    assert merged["rows"][-1]["subject"] == pytest.approx(b["rows"][-1]["subject"])
    assert "| e2e hm-cfg w_base=2 w_pers=2 |" in printed and "At equal retrieval top-1" in printed
    assert Image.open(plot).format == "PNG"

    assert [r["kind"] for r in b["rows"]] == ["references", "hm-cfg"]  # --kinds hm-cfg: no floor or CFG rows generated
    with pytest.raises(ConfigError, match="no row of hypernetwork 'other'"):
        merge_results([("a", a), ("b", b)], keep=["e2e", "other"])
    other = {**b, "settings": {**b["settings"], "steps": 3}}
    (tmp_path / "other.json").write_text(json.dumps(other))
    changed = {**b, "rows": [{**r, "retrieval": (r["retrieval"] or 0) + 0.5} if r["kind"] == "references" else r for r in b["rows"]]}
    (tmp_path / "changed.json").write_text(json.dumps(changed))
    elsewhere = {**b, "settings": {**b["settings"], "hypernet_folders": {"e2e": "runs/another"}}}
    (tmp_path / "elsewhere.json").write_text(json.dumps(elsewhere))
    (tmp_path / "notjson.json").write_bytes(b"\x89PNG")
    (tmp_path / "nosettings.json").write_text(json.dumps({**b, "settings": None}))
    (tmp_path / "badrow.json").write_text(json.dumps({**b, "rows": [{"kind": "cfg"}]}))
    (tmp_path / "otherbatch.json").write_text(json.dumps({**b, "settings": {**b["settings"], "batch_size": 4}}))
    for name, message in (
        ("other", "'steps' differs"), ("otherbatch", "'batch_size' differs"), ("changed", "other figures"), ("elsewhere", "runs/another"),
        ("notjson", "not a JSON file"), ("missing", "cannot be read"), ("nosettings", "not an eval-personalization result"), ("badrow", "row 0"),
    ):
        assert main(["world", "merge-evals", str(tmp_path / "a.json"), str(tmp_path / f"{name}.json"), "--json", str(tmp_path / "bad.json")]) == 2
        err = capsys.readouterr().err
        assert message in err and f"{name}.json" in err, err
        assert not (tmp_path / "bad.json").exists()


def test_cli_merge_evals_tells_a_retrained_checkpoint_apart_and_takes_chosen_labels_per_file(
    tiny_world_model, oracles_dir, hypernet_dir, tmp_path, capsys
):
    """A checkpoint retrained into the same folder is another model for merge-evals (its weights digest differs);
    FILE:LABELS takes only some hypernetworks' rows from an older run (e.g. the DreamBooth-LoRA ceiling)."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(hypernet_dir, folder)
    common = [
        "world", "eval-personalization", "--model", str(tiny_world_model), "--oracles", str(oracles_dir),
        "--num-identities", "2", "--prompts", "1", "--steps", "2", "--kinds", "cfg",
    ]
    other = tmp_path / "other"
    shutil.copytree(hypernet_dir, other)
    assert main(common + ["--hypernet", str(folder), "--label", "e2e", "--hypernet", str(other), "--label", "other:x",
                          "--json", str(tmp_path / "old.json")]) == 0
    weights = load_file(folder / "hypernet.safetensors")  # "retrain": other weights in the same folder
    save_file({k: v + 0.05 if v.is_floating_point() else v for k, v in weights.items()}, folder / "hypernet.safetensors")
    assert main(common + ["--hypernet", str(folder), "--label", "e2e", "--json", str(tmp_path / "new.json")]) == 0
    capsys.readouterr()
    merged = tmp_path / "merged.json"
    assert main(["world", "merge-evals", str(tmp_path / "new.json"), str(tmp_path / "old.json"), "--json", str(merged)]) == 2
    assert "label 'e2e' names hypernetwork" in capsys.readouterr().err and not merged.exists()
    assert main(["world", "merge-evals", str(tmp_path / "new.json"), f"{tmp_path / 'old.json'}:other:x", "--json", str(merged)]) == 0
    rows = json.loads(merged.read_text())["rows"]
    new = {r["label"]: r for r in json.loads((tmp_path / "new.json").read_text())["rows"]}
    assert [r["label"] for r in rows] == ["references (renders, k=1)", "e2e cfg g=3", "other:x cfg g=3"]
    assert rows[1]["subject"] == pytest.approx(new["e2e cfg g=3"]["subject"])
    assert main(["world", "merge-evals", str(tmp_path / "new.json"), f"{tmp_path / 'old.json'}:nothing"]) == 2
    assert "no row of hypernetwork 'nothing'" in capsys.readouterr().err
    assert main(["world", "merge-evals", str(tmp_path / "new.json"), f"{tmp_path / 'old.json'}:"]) == 2
    assert "no hypernetwork labels after the colon" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--hypernet", "{tmp}/missing"], "missing"),
        (["--num-identities", "0"], "--num-identities=0"),
        (["--w-base", "1,x"], "'x'"),
        (["--w-base", "1,2", "--w-pers", "1,2,3"], "differ in length"),
        (["--w-pers", "-1"], "-1"),
        (["--refs", "1,0"], "--refs"),
        (["--dreambooth-steps", "0"], "--dreambooth-steps"),
        (["--multi-reference", "median"], "median"),
        (["--pers-interval", "0.5,2"], "--pers-interval '0.5,2'"),
        (["--kinds", "cfg,pag"], "pag"),
        (["--json", "{tmp}/no/such/out.json"], "no/such"),
    ],
)
def test_cli_bad_input(extra, message, tiny_world_model, oracles_dir, hypernet_dir, tmp_path, capsys):
    args = ["world", "eval-personalization", "--model", str(tiny_world_model), "--oracles", str(oracles_dir), "--num-identities", "1", "--steps", "1"]
    if "--hypernet" not in extra:
        args += ["--hypernet", str(hypernet_dir)]
    assert main(args + [e.format(tmp=tmp_path) for e in extra]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_hyperdreambooth_rows_with_inference_options(tiny_world_model, oracles_dir, tmp_path, capsys):
    """One HyperDreamBooth folder as several rows (K refinement steps, fast fine-tune steps) through --with."""
    from hyperbooth.backbones.world import WorldBackbone
    from hyperbooth.methods.hyperdreambooth import HyperDreamBooth, HyperDreamBoothConfig

    cfg = HyperDreamBoothConfig(a=8, b=6, d_model=32, layers=1, heads=2, encoder="world", encoder_dim=16, weight_loss=0.0)
    folder = HyperDreamBooth.for_backbone(cfg, WorldBackbone.from_pretrained(tiny_world_model)).save_pretrained(tmp_path / "hdb")
    common = ["world", "eval-personalization", "--model", str(tiny_world_model), "--oracles", str(oracles_dir), "--num-identities", "1",
              "--prompts", "1", "--steps", "1", "--kinds", "cfg"]
    args = list(common)
    for label, options in (("hdb-k1", "iterations=1"), ("hdb-k2-ft2", "iterations=2,fast_finetune_steps=2")):
        args += ["--hypernet", str(folder), "--label", label, "--with", options]
    assert main(args) == 0
    printed = capsys.readouterr().out
    table = {line.split("|")[1].strip(): line for line in printed.splitlines() if line.startswith("| hdb")}
    assert set(table) == {"hdb-k1 cfg g=3", "hdb-k2-ft2 cfg g=3"}
    personalize_ms = lambda line: float(line.rstrip(" |").split("|")[-1])  # noqa: E731
    assert personalize_ms(table["hdb-k2-ft2 cfg g=3"]) > personalize_ms(table["hdb-k1 cfg g=3"])  # the fine-tune's own clock
    for bad, message in ((["--with", "iterations=0"], "iterations=0"), (["--with", "rank=2"], "not an inference option"),
                         (["--with", "a", "--with", "b=1"], "not KEY=VALUE"), (["--with", "", "--with", "b=1"], "2 --with for 1 --hypernet")):
        assert main([*common, "--hypernet", str(folder), *bad]) == 2
        assert message in capsys.readouterr().err
