import pytest
import torch
from diffusers import DDPMScheduler

from hyperbooth.errors import ConfigError
from hyperbooth.sampling import SCHEDULERS, denoise, make_scheduler


def _model_fn(x_t, t):
    return 0.1 * x_t + 0.001 * t.view(-1, 1, 1, 1).float()


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_runs_and_is_seeded(name):
    sched = make_scheduler(name, DDPMScheduler(beta_schedule="scaled_linear", prediction_type="epsilon"))
    a = denoise(_model_fn, sched, (2, 3, 4, 4), steps=4, generator=torch.Generator().manual_seed(1))
    sched = make_scheduler(name, DDPMScheduler(beta_schedule="scaled_linear", prediction_type="epsilon"))
    b = denoise(_model_fn, sched, (2, 3, 4, 4), steps=4, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_callback_and_bad_arguments():
    sched = make_scheduler("ddim", DDPMScheduler())
    seen = []
    denoise(_model_fn, sched, (1, 3, 4, 4), steps=3, callback=lambda i, t, x: seen.append(i))
    assert seen == [0, 1, 2]
    for steps in (0, -2, 2.5):
        with pytest.raises(ConfigError, match="steps"):
            denoise(_model_fn, sched, (1, 3, 4, 4), steps=steps)
    with pytest.raises(ConfigError, match="unknown scheduler 'plms2'"):
        make_scheduler("plms2", DDPMScheduler())
