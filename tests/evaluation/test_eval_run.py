import json

import pytest
import torch

from hyperbooth.cli import main
from hyperbooth.config import load_config
from hyperbooth.errors import CheckpointError, ConfigError
from hyperbooth.evaluation.protocol import EvalConfig, run_eval
from tests.evaluation.conftest import needs_dreambench

WORLD = "configs/eval_world.yaml"
SD15 = "configs/eval_dreambench_sd15.yaml"


def _world_overrides(model, oracles, *more):
    return [f"backend.model={model}", f"metrics.oracles={oracles}", "backend.steps=2", "data.world_subjects=1", "data.world_references=2",
            "data.max_prompts=1", "images_per_prompt=2", *more]


def test_world_eval_end_to_end_writes_json_and_report(tiny_world_model, random_oracles, tmp_path, capsys):
    out, report = tmp_path / "eval.json", tmp_path / "eval.html"
    code = main(["eval", "--config", WORLD, "--json", str(out), "--report", str(report), *_world_overrides(tiny_world_model, random_oracles)])
    assert code == 0
    results = json.loads(out.read_text())
    assert results["status"] == "complete" and results["failures"] == []
    assert results["method"]["kind"] == "base" and results["protocol"]["seeds"] == [0, 1]
    (name, subject), = results["subjects"].items()
    assert name.startswith("world-") and subject["identity_seed"] == int(name.split("-")[1]) and subject["reference_count"] == 2
    (prompt, record), = subject["prompts"].items()
    assert prompt == f"a {subject['class']} in the snow"  # the floor samples the class prompt (the world's first)
    assert set(record["scores"]) == {"oracle_retrieval", "oracle_auc", "oracle_subject", "oracle_prompt"}
    assert all(v in (0.0, 1.0) for v in record["scores"]["oracle_retrieval"]) and all(0 <= v <= 1 for v in record["scores"]["oracle_auc"])
    assert len(record["scores"]["oracle_subject"]) == 2 and all(-1 <= v <= 1 for v in record["scores"]["oracle_subject"])
    assert all(v in (0.0, 1.0) for v in record["scores"]["oracle_prompt"])
    assert results["summary"]["oracle_subject"]["n"] == 2
    page = report.read_text()
    assert page.count("data:image/png;base64,") == 2 + 2  # references + generations, embedded
    assert "oracle_subject" in page and prompt in page
    printed = capsys.readouterr().out
    assert "| subject | class | oracle_retrieval | oracle_auc | oracle_subject | oracle_prompt | failed |" in printed and name in printed


def test_world_seeds_are_fixed_per_image(tiny_world_model, random_oracles, tmp_path):
    from hyperbooth.evaluation.backends import WorldBackend

    backend = WorldBackend(str(tiny_world_model), steps=2, num_subjects=1)
    both = backend.generate(["a toy in the snow", "a toy in the snow"], [3, 4])
    alone = backend.generate(["a toy in the snow"], [4])
    assert torch.allclose(both[1:], alone, atol=1e-5) and not torch.allclose(both[0], both[1])


def test_world_hypernet_and_lora_folder_methods(tiny_world_model, random_oracles, tmp_path):
    from hyperbooth.evaluation.backends import WorldBackend
    from hyperbooth.lora import LoRAWeights, save_lora, target_shapes
    from hyperbooth.methods.e2e import E2EConfig, E2EHyperNetwork

    backend = WorldBackend(str(tiny_world_model), steps=2, num_subjects=1, references=2)  # shared by the runs below
    shapes = target_shapes(backend.backbone.unet)
    torch.manual_seed(0)
    hypernet = E2EHyperNetwork(E2EConfig(d_model=32, layers=1, heads=2, encoder_dim=16), shapes).save_pretrained(tmp_path / "hyper")
    cfg = load_config(EvalConfig, WORLD, _world_overrides(tiny_world_model, random_oracles, "method.kind=personalizer", f"method.path={hypernet}", "method.guidance=hm-cfg"))
    results = run_eval(cfg, tmp_path / "hyper.json", backend=backend)
    (subject,) = results["subjects"].values()
    assert results["status"] == "complete" and list(subject["prompts"])[0].startswith("a sks ")
    assert subject["personalize_seconds"] is not None and results["method"]["kind"] == "e2e"
    assert "e2e personalizer" in results["method"]["description"] and "HM-CFG w_base=2 w_pers=2" in results["method"]["description"]

    # a LoRA folder where the one subject has no file: marked as failed, the JSON kept
    loras = tmp_path / "loras"
    loras.mkdir()
    cfg = load_config(EvalConfig, WORLD, _world_overrides(tiny_world_model, random_oracles, "method.kind=lora_folder", f"method.path={loras}", "metrics.use=[oracle_prompt]"))
    results = run_eval(cfg, tmp_path / "missing.json", backend=backend)
    assert results["status"] == "partial" and results["failures"][0]["stage"] == "personalize"
    assert "no LoRA file for subject" in results["failures"][0]["error"]
    assert json.loads((tmp_path / "missing.json").read_text())["status"] == "partial"

    name = next(iter(results["subjects"]))
    weights = LoRAWeights.random(shapes, rank=2, std=0.05, generator=torch.Generator().manual_seed(0))
    save_lora(loras / f"{name}.safetensors", weights, "kohya", models={"unet": backend.backbone.unet})
    results = run_eval(cfg, tmp_path / "lora.json", backend=backend)
    assert results["status"] == "complete" and len(results["subjects"][name]["prompts"]) == 1


def _sd_overrides(pipe, dataset, *more):
    return [f"backend.model={pipe}", "backend.device=cpu", "backend.dtype=float32", "backend.steps=2", "backend.resolution=0",
            f"data.dataset={dataset}", "data.subjects=[backpack]", "data.reference_size=32", "data.max_prompts=1", "metrics.device=cpu",
            "images_per_prompt=2", *more]


@needs_dreambench
def test_diffusers_eval_end_to_end(tiny_sd, dreambench_one, tiny_dino, tiny_clip, tmp_path):
    out, report = tmp_path / "sd.json", tmp_path / "sd.html"
    code = main(["eval", "--config", SD15, "--json", str(out), "--report", str(report),
                 *_sd_overrides(tiny_sd, dreambench_one, f"metrics.dino={tiny_dino}", f"metrics.clip={tiny_clip}", "report.embed_images=false", "report.thumbnail=16")])
    assert code == 0
    results = json.loads(out.read_text())
    record = results["subjects"]["backpack"]["prompts"]["a backpack in the jungle"]
    assert set(record["scores"]) == {"dino", "clip_i", "clip_t"} and all(len(v) == 2 for v in record["scores"].values())
    assert record["metric_prompt"] == "a backpack in the jungle"
    assert results["subjects"]["backpack"]["references"][0].endswith("00.jpg")
    page = report.read_text()
    images = sorted(p.name for p in (tmp_path / "sd_images" / "backpack").iterdir())
    assert images == ["p00_0.png", "p00_1.png", "ref_0.png", "ref_1.png"] and "sd_images/backpack/p00_0.png" in page

    # the same seeds give the same images: a second run scores identically
    again = tmp_path / "again.json"
    assert main(["eval", "--config", SD15, "--json", str(again), *_sd_overrides(tiny_sd, dreambench_one, "metrics.use=[clip_i]", f"metrics.clip={tiny_clip}")]) == 0
    again_scores = json.loads(again.read_text())["subjects"]["backpack"]["prompts"]["a backpack in the jungle"]["scores"]["clip_i"]
    assert again_scores == pytest.approx(record["scores"]["clip_i"], abs=1e-5)


def test_bad_inputs_fail_before_sampling_with_named_errors(tiny_world_model, random_oracles, tiny_sd, tmp_path, capsys):
    # a missing metric checkpoint: exit 2, the path named
    code = main(["eval", "--config", WORLD, "--json", str(tmp_path / "x.json"),
                 *_world_overrides(tiny_world_model, random_oracles, "metrics.use=[dino]", f"metrics.dino={tmp_path / 'missing_dino'}")])
    assert code == 2 and "missing_dino" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
    # a prompts file of another layout
    bad = tmp_path / "prompts.txt"
    bad.write_text("a sks dog in the snow\n")
    assert main(["eval", "--config", WORLD, "--json", str(tmp_path / "x.json"), *_world_overrides(tiny_world_model, random_oracles, f"data.prompts_file={bad}")]) == 2
    assert "prompts.txt" in capsys.readouterr().err
    # an empty subject folder
    dataset = tmp_path / "dataset"
    (dataset / "dog").mkdir(parents=True)
    (dataset / "prompts_and_classes.txt").write_text(
        "Classes\nsubject_name,class\ndog,dog\nObject Prompts\nprompt_list = [\n'a {0} {1} x'.format(unique_token, class_token),\n]\n"
        "Live Subject Prompts\nprompt_list = [\n'a {0} {1} y'.format(unique_token, class_token),\n]\n")
    assert main(["eval", "--config", SD15, "--json", str(tmp_path / "x.json"), f"backend.model={tiny_sd}", "backend.device=cpu", "backend.dtype=float32",
                 f"data.dataset={dataset}", "metrics.use=[face]"]) == 2
    assert "dog holds no images" in capsys.readouterr().err
    # config values are named
    with pytest.raises(ConfigError, match="metrics.use has unknown metric 'fid'"):
        load_config(EvalConfig, WORLD, ["metrics.use=[fid]"])
    with pytest.raises(ConfigError, match="oracle_subject"):
        load_config(EvalConfig, SD15, ["metrics.use=[oracle_subject]"])
    with pytest.raises(ConfigError, match="method.path"):
        load_config(EvalConfig, WORLD, ["method.kind=personalizer"])
    with pytest.raises(ConfigError, match="'hypernet' is not one of base, lora_folder, personalizer, dreambooth-lora, e2e"):
        load_config(EvalConfig, WORLD, ["method.kind=hypernet"])
    with pytest.raises(ConfigError, match="the floor .* samples with cfg"):  # never a silent HM-CFG → CFG
        load_config(EvalConfig, WORLD, ["method.guidance=hm-cfg"])
    with pytest.raises(ConfigError, match="'e2e' is trained ahead"):
        load_config(EvalConfig, WORLD, ["method.kind=e2e"])
    with pytest.raises(ConfigError, match="method.options"):
        load_config(EvalConfig, WORLD, ["method.kind=personalizer", "method.path=x", "method.options={steps: 3}"])
    with pytest.raises(ConfigError, match="method.options: unknown config key 'nonsense'"):
        run_eval(load_config(EvalConfig, WORLD, _world_overrides(tiny_world_model, random_oracles, "method.kind=dreambooth-lora",
                                                                 "method.options={nonsense: 1}")), tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()
    assert load_config(EvalConfig, SD15, ["method.kind=personalizer", "method.path=x", "method.guidance=hm-cfg"]).method.guidance == "hm-cfg"
    with pytest.raises(CheckpointError, match="no_pipe"):
        run_eval(load_config(EvalConfig, SD15, [f"backend.model={tmp_path / 'no_pipe'}", "metrics.use=[face]"]), tmp_path / "x.json")


def _dreambench_folder(root, size: int = 32):
    """A DreamBench-layout folder of one subject (two pattern photos) and a prompts file of two object prompts."""
    from PIL import Image

    from hyperbooth.grids import to_uint8
    from tests.evaluation.conftest import pattern_image

    dataset = root / "dataset"
    (dataset / "toy").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(to_uint8(pattern_image(i, size)[None])[0]).save(dataset / "toy" / f"{i:02d}.png")
    (dataset / "prompts_and_classes.txt").write_text(
        "Classes\nsubject_name,class\ntoy,toy\nObject Prompts\nprompt_list = [\n'a {0} {1} in the jungle'.format(unique_token, class_token),\n"
        "'a red {0} {1}'.format(unique_token, class_token),\n]\nLive Subject Prompts\nprompt_list = [\n'a {0} {1} y'.format(unique_token, class_token),\n]\n")
    return dataset


def test_diffusers_backend_samples_cfg_and_hm_cfg_through_generate(tiny_sd, tiny_clip, tmp_path):
    """SD 1.5 goes through hyperbooth.generate like the world: HM-CFG works (w_pers = 0 is base CFG at w_base), each
    image's noise comes from its own seed, and a whole `hyperbooth eval` run with HM-CFG completes."""
    from hyperbooth.evaluation.backends import DiffusersBackend, Guidance
    from hyperbooth.lora import LoRAWeights, save_lora

    dataset = _dreambench_folder(tmp_path)
    backend = DiffusersBackend(str(tiny_sd), str(dataset), device="cpu", steps=2, scheduler="ddim", reference_size=32)
    lora = {"unet": LoRAWeights.random(backend.backbone.target_shapes(), rank=2, std=0.3, generator=torch.Generator().manual_seed(0))}
    prompt = ["a sks toy in the jungle"]
    base = backend.generate(prompt, [5], None, Guidance("cfg", guidance_scale=4.0))
    hm0 = backend.generate(prompt, [5], lora, Guidance("hm-cfg", w_base=4.0, w_pers=0.0))
    hm = backend.generate(prompt, [5], lora, Guidance("hm-cfg", w_base=4.0, w_pers=2.0))
    assert base.shape == (1, 3, backend.backbone.resolution, backend.backbone.resolution)
    torch.testing.assert_close(hm0, base, rtol=1e-4, atol=1e-4)
    assert (hm - base).abs().max() > 1e-3  # the personalized branch acts
    both = backend.generate(prompt * 2, [3, 4], lora, Guidance("cfg"))
    alone = backend.generate(prompt, [4], lora, Guidance("cfg"))
    torch.testing.assert_close(both[1:], alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(both[0], both[1])
    with pytest.raises(ConfigError, match="hm-cfg"):  # HM-CFG without a personalized model: refused, not replaced
        backend.generate(prompt, [5], None, Guidance("hm-cfg"))

    loras = tmp_path / "loras"
    loras.mkdir()
    save_lora(loras / "toy.safetensors", lora["unet"], models=backend.models())
    cfg = load_config(EvalConfig, SD15, [f"backend.model={tiny_sd}", "backend.device=cpu", "backend.dtype=float32", "backend.steps=2",
                                          "backend.resolution=0", f"data.dataset={dataset}", "data.reference_size=32", "data.max_prompts=1",
                                          "method.kind=lora_folder", f"method.path={loras}", "method.guidance=hm-cfg", "metrics.use=[clip_i]",
                                          f"metrics.clip={tiny_clip}", "metrics.device=cpu", "images_per_prompt=2"])
    results = run_eval(cfg, tmp_path / "hm.json", backend=backend)
    record = results["subjects"]["toy"]["prompts"]["a sks toy in the jungle"]
    assert results["status"] == "complete" and len(record["scores"]["clip_i"]) == 2
    assert "HM-CFG w_base=2 w_pers=2" in results["method"]["description"]  # hyperbooth.guidance's defaults
