import numpy as np
import pytest
import torch

from hyperbooth.errors import CheckpointError
from hyperbooth.world.oracles import (
    ContextClassifier,
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


@pytest.mark.slow
def test_oracles_learn_on_held_out_identities():
    from hyperbooth.world.oracles import train_context_classifier

    cfg = OracleTrainConfig(steps=250, pool_identities=1500, pool_contexts=4000)
    figures = evaluate_oracles(train_identity_encoder(cfg, progress=False), train_context_classifier(cfg, progress=False), n=200)
    assert figures["identity_roc_auc"] > 0.85
    assert figures["background_accuracy"] > 0.8
