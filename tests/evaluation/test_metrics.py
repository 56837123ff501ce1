import math

import numpy as np
import pytest
import torch

from hyperbooth.errors import CheckpointError, ConfigError
from hyperbooth.evaluation.dreambench import Subject
from hyperbooth.evaluation.metrics import (
    ClipImageMetric,
    ClipTextMetric,
    DinoMetric,
    FaceIdentityMetric,
    OraclePromptFidelity,
    OracleSubjectFidelity,
    build_metrics,
    to_pil,
)
from tests.evaluation.conftest import DREAMBENCH, altered, needs_dreambench, pattern_image


def _pair():
    image = pattern_image(0)
    return torch.stack([image, altered(image)]), image[None]  # generated: (identical, altered); references


@pytest.mark.parametrize("checkpoint", ["tiny_dino", "tiny_vit"])
def test_dino_identical_is_one_and_altered_scores_lower(checkpoint, request):
    folder = request.getfixturevalue(checkpoint)
    metric = DinoMetric(folder)
    generated, refs = _pair()
    scores = metric(generated, refs)
    assert scores.shape == (2,)
    assert scores[0].item() == pytest.approx(1.0, abs=1e-5)
    assert scores[1] < scores[0] - 1e-3
    assert "DINO" in metric.describe() and str(folder) in metric.describe()


@pytest.mark.parametrize("checkpoint", ["tiny_dino", "tiny_vit"])
def test_dino_is_the_cls_of_the_checkpoint_with_its_processor(checkpoint, request):
    from transformers import AutoImageProcessor, AutoModel

    tiny_dino = request.getfixturevalue(checkpoint)
    metric = DinoMetric(tiny_dino)
    images = torch.stack([pattern_image(1, 40), pattern_image(2, 40)])
    processor, model = AutoImageProcessor.from_pretrained(tiny_dino), AutoModel.from_pretrained(tiny_dino).eval()
    with torch.no_grad():
        cls = model(**processor(images=to_pil(images), return_tensors="pt")).last_hidden_state[:, 0]
    expected = torch.nn.functional.cosine_similarity(cls[:1], cls[1:]).item()
    assert metric(images[:1], images[1:]).item() == pytest.approx(expected, abs=1e-5)
    assert metric.pixel_values(images).shape[-2:] == (32, 32)  # resized/cropped as its preprocessor_config says


def test_clip_i_identical_is_one_and_altered_scores_lower(tiny_clip):
    metric = ClipImageMetric(tiny_clip)
    generated, refs = _pair()
    scores = metric(generated, refs)
    assert scores[0].item() == pytest.approx(1.0, abs=1e-5) and scores[1] < scores[0] - 1e-3
    subject = Subject("s", "toy", "object", refs)
    assert torch.allclose(metric(generated, subject), scores)  # a Subject works too (its embeddings are cached)


def test_clip_t_matches_clipmodel_logits(tiny_clip):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    metric = ClipTextMetric(tiny_clip)
    images = torch.stack([pattern_image(3), altered(pattern_image(3))])
    prompts = ["a dog in the snow", "a red backpack"]
    scores = metric(images, prompts)
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    pixels = CLIPImageProcessor.from_pretrained(tiny_clip)(images=to_pil(images), return_tensors="pt")["pixel_values"]
    tokens = AutoTokenizer.from_pretrained(tiny_clip)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels).logits_per_image
    expected = logits.diagonal() / model.logit_scale.exp()
    assert torch.allclose(scores, expected, atol=1e-5)
    assert metric(images, "a dog in the snow").shape == (2,)  # one prompt for all
    with pytest.raises(ConfigError, match="2 generated images need 2 prompts"):
        metric(images, ["a", "b", "c"])


def test_missing_or_incomplete_checkpoint_is_named(tmp_path, tiny_clip):
    with pytest.raises(CheckpointError, match="no_such_dino"):
        DinoMetric(tmp_path / "no_such_dino")
    with pytest.raises(CheckpointError, match="no_such_clip"):
        build_metrics(["clip_t"], clip=str(tmp_path / "no_such_clip"))
    with pytest.raises(ConfigError, match="metrics.dino"):
        build_metrics(["dino"])
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="bare.*preprocessor_config.json"):
        DinoMetric(tmp_path / "bare")
    with pytest.raises(ConfigError, match="unknown metric 'fid'"):
        build_metrics(["fid"])


def test_face_metric_counts_images_without_faces():
    pytest.importorskip("dlib")
    metric = FaceIdentityMetric()
    flat = torch.zeros(2, 3, 64, 64)
    scores = metric(flat, flat[:1])  # no face anywhere: NaN, not a crash
    assert scores.shape == (2,) and torch.isnan(scores).all()
    assert "dlib" in metric.describe()


def test_face_metric_scores_the_descriptors(monkeypatch):
    pytest.importorskip("dlib")
    metric = FaceIdentityMetric()
    a, b = np.eye(128, dtype=np.float32)[0], np.eye(128, dtype=np.float32)[1]
    refs, generated = torch.zeros(2, 3, 8, 8), torch.ones(3, 3, 8, 8)
    fake = {0.0: [a, None], 1.0: [a, None, (a + b) / 2]}  # references: one face; generated: same, none, half
    monkeypatch.setattr(metric, "descriptors", lambda images: fake[float(images[0, 0, 0, 0])])
    scores = metric(generated, refs)
    assert scores[0].item() == pytest.approx(1.0) and math.isnan(scores[1]) and scores[2].item() == pytest.approx(math.sqrt(0.5))


@needs_dreambench
def test_face_metric_on_a_real_photo_without_a_human_face():
    pytest.importorskip("dlib")
    from hyperbooth.images import load_image

    photo = load_image(DREAMBENCH / "backpack" / "00.jpg", size=160)[None]
    assert torch.isnan(FaceIdentityMetric()(photo, photo)).all()


def test_oracle_metrics_wrap_the_world_functions(random_oracles):
    from hyperbooth.world import contexts as ctx
    from hyperbooth.world.fidelity import prompt_fidelity, reference_images, subject_fidelity
    from hyperbooth.world.identity import identity_class
    from hyperbooth.world.oracles import Oracles

    oracles = Oracles.load(random_oracles)
    seed = 7
    images = reference_images(seed, 3)
    subject = Subject("world-7", identity_class(seed), "object", images[:1], identity_seed=seed)
    scores = OracleSubjectFidelity(oracles)(images, subject)
    assert torch.allclose(scores, subject_fidelity(oracles, images, [seed] * 3))
    with pytest.raises(ConfigError, match="identity seed"):
        OracleSubjectFidelity(oracles)(images, images[:1])

    class_name = identity_class(seed)
    prompts = [ctx.prompt_for(class_name, ctx.Context(background="snow")), ctx.prompt_for(class_name, ctx.Context(recolor="red")), f"a {class_name}"]
    got = OraclePromptFidelity(oracles)(images, prompts)
    contexts = [ctx.Context(background="snow"), ctx.Context(recolor="red"), ctx.Context()]
    expected = prompt_fidelity(oracles, images, [class_name] * 3, contexts)["context"]
    assert torch.allclose(got[:2], expected[:2]) and math.isnan(got[2]) and math.isnan(expected[2])
    with pytest.raises(ConfigError, match="not a DreamBench-World prompt"):
        OraclePromptFidelity(oracles)(images[:1], ["a dog in a chef outfit"])
    with pytest.raises(CheckpointError, match="no_oracles"):
        build_metrics(["oracle_subject"], oracles="no_oracles")
