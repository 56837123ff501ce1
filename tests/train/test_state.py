import pytest
import torch

from hyperbooth.errors import CheckpointError
from hyperbooth.train.ema import EMA
from hyperbooth.train.state import latest_checkpoint, load_state, save_state, warmup_cosine, write_checkpoint


def test_warmup_cosine_shape():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(100, 10, 100, min_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine(55, 10, 100, min_ratio=0.0) == pytest.approx(0.5)


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    for step in (1, 2, 3):
        write_checkpoint(tmp_path, step, lambda f, s=step: save_state(f / "state.pt", {"step": s}), keep=2)
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step-0000003" and load_state(latest / "state.pt")["step"] == 3
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-0000002", "step-0000003"]

    def crash(folder):
        (folder / "partial").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_checkpoint(tmp_path, 4, crash)
    assert latest_checkpoint(tmp_path).name == "step-0000003"  # the interrupted write never became "latest"
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_state_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match="state.pt"):
        load_state(tmp_path / "state.pt")


def test_ema_tracks_and_restores():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(50):
        ema.update(model)
    target = torch.nn.Linear(2, 2)
    ema.copy_to(target)
    torch.testing.assert_close(target.weight, torch.ones(2, 2), rtol=1e-4, atol=1e-4)
    other = EMA(model, decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 50
