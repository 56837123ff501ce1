import numpy as np
import pytest
import torch

from hyperbooth.errors import CheckpointError
from hyperbooth.world.identity import make_identity
from hyperbooth.world.oracles import (
    ATTRIBUTE_CHANCE,
    IGNORE,
    AttributeClassifier,
    ContextClassifier,
    attribute_correct,
    attribute_labels,
    train_attribute_classifier,
    IdentityEncoder,
    OracleTrainConfig,
    Oracles,
    evaluate_oracles,
    roc_auc,
    save_oracles,
    train_identity_encoder,
)


def test_roc_auc_reference_values():
    assert roc_auc(torch.tensor([0.9, 0.8]), torch.tensor([0.1, 0.2])) == 1.0
    assert roc_auc(torch.tensor([0.1]), torch.tensor([0.9])) == 0.0
    assert roc_auc(torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5])) == 0.5
    assert roc_auc(torch.tensor([0.3, 0.7]), torch.tensor([0.5])) == 0.5


def test_short_training_runs_and_round_trips(tmp_path):
    cfg = OracleTrainConfig(steps=3, batch_identities=8, pool_identities=16, pool_views=2)
    identity = train_identity_encoder(cfg, progress=False)
    context = ContextClassifier().eval()
    figures = evaluate_oracles(identity, context, n=16)
    assert 0.0 <= figures["identity_roc_auc"] <= 1.0
    z = identity(torch.rand(3, 3, 32, 32) * 2 - 1)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(3))
    save_oracles(tmp_path, identity, context, cfg, figures)
    loaded = Oracles.load(tmp_path)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(loaded.identity(x), identity(x))


def test_damaged_oracles_name_the_file(tmp_path):
    save_oracles(tmp_path, IdentityEncoder(), ContextClassifier(), OracleTrainConfig(), {})
    (tmp_path / "context.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="context.safetensors.*train-oracles"):
        Oracles.load(tmp_path)
    with pytest.raises(CheckpointError, match="oracles.json"):
        Oracles.load(tmp_path / "missing")


def test_attribute_labels_ignore_what_the_image_cannot_show():
    from dataclasses import replace

    identity = replace(make_identity(3), pattern="stripes", feature="none", secondary=(230, 40, 40))  # red stripes
    labels = attribute_labels(identity)
    assert labels["primary"] != IGNORE and labels["secondary"] != IGNORE and labels["pattern"] == 1
    assert all(0 <= labels[f"shape_{i}"] < 5 for i in range(3))
    assert attribute_labels(identity, "purple")["primary"] == IGNORE  # recoloured: the own primary is not shown
    assert attribute_labels(identity, "purple")["secondary"] != IGNORE
    assert attribute_labels(identity, "red")["secondary"] == IGNORE  # red stripes on a red subject
    assert attribute_labels(replace(identity, pattern="solid"))["secondary"] == IGNORE  # solid, no feature
    assert attribute_labels(replace(identity, pattern="solid", feature="patch"))["secondary"] != IGNORE
    assert ATTRIBUTE_CHANCE == pytest.approx({"primary": 0.1, "secondary": 1 / 11, "pattern": 1 / 6, "shape": 0.2})


def test_attribute_correct_masks_ignored_labels_and_averages_shape():
    pred = {"primary": torch.tensor([1, 2]), "secondary": torch.tensor([0, 0]), "pattern": torch.tensor([3, 4]),
            "shape_0": torch.tensor([0, 1]), "shape_1": torch.tensor([0, 1]), "shape_2": torch.tensor([0, 1])}
    labels = {"primary": torch.tensor([1, IGNORE]), "secondary": torch.tensor([IGNORE, 1]), "pattern": torch.tensor([3, 3]),
              "shape_0": torch.tensor([0, 1]), "shape_1": torch.tensor([1, 1]), "shape_2": torch.tensor([0, 0])}
    out = attribute_correct(pred, labels)
    assert out["primary"][0] == 1 and out["primary"][1].isnan() and out["secondary"][0].isnan() and out["secondary"][1] == 0
    assert out["pattern"].tolist() == [1, 0]
    assert out["shape"].tolist() == pytest.approx([2 / 3, 2 / 3])


def test_attribute_classifier_trains_saves_and_loads(tmp_path):
    cfg = OracleTrainConfig(attribute_renders=32, attribute_steps=2, batch_size=8)
    attributes = train_attribute_classifier(cfg, progress=False)
    identity, context = IdentityEncoder().eval(), ContextClassifier().eval()
    figures = evaluate_oracles(identity, context, n=8, attributes=attributes)
    assert all(0 <= figures[f"attribute_{a}_accuracy"] <= 1 for a in ATTRIBUTE_CHANCE)
    save_oracles(tmp_path / "with", identity, context, cfg, figures, attributes)
    loaded = Oracles.load(tmp_path / "with")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert all(torch.equal(loaded.attributes.predict(x)[k], v) for k, v in attributes.predict(x).items())
    save_oracles(tmp_path / "without", identity, context, cfg, figures)
    assert Oracles.load(tmp_path / "without").attributes is None
    (tmp_path / "with" / "attributes.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="attributes.safetensors"):
        Oracles.load(tmp_path / "with")


@pytest.mark.slow
def test_oracles_learn_on_held_out_identities():
    from hyperbooth.world.oracles import train_context_classifier

    cfg = OracleTrainConfig(steps=250, pool_identities=1500, pool_contexts=4000)
    figures = evaluate_oracles(train_identity_encoder(cfg, progress=False), train_context_classifier(cfg, progress=False), n=200)
    assert figures["identity_roc_auc"] > 0.85
    assert figures["background_accuracy"] > 0.8
