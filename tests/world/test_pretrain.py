import pytest
import torch

from hyperbooth.encoders import build_encoder, load_world_encoder
from hyperbooth.errors import CheckpointError
from hyperbooth.world.pretrain import EncoderPretrainConfig, pretrain_world_encoder, save_world_encoder


def test_pretrained_world_encoder_round_trip_is_frozen(tmp_path):
    cfg = EncoderPretrainConfig(steps=2, pool_identities=24, batch_identities=8, pool_views=2, width=16, dim=32)
    encoder, figures = pretrain_world_encoder(cfg, progress=False)
    assert 0.0 <= figures["val_identity_roc_auc"] <= 1.0
    save_world_encoder(tmp_path, encoder, cfg, figures)
    loaded = load_world_encoder(tmp_path)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(loaded(x), encoder(x))
    assert loaded(x).shape == (2, 64, 32)
    assert not loaded.trainable and not any(p.requires_grad for p in loaded.parameters())


def test_missing_world_encoder_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(CheckpointError, match=r"world_encoder.safetensors.*train-encoder"):
        load_world_encoder(tmp_path)
    assert build_encoder("world").trainable
