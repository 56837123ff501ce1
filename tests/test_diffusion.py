import pytest
import torch
from diffusers import DDPMScheduler

from hyperbooth.diffusion import diffusion_loss, loss_weights, snr, training_target
from hyperbooth.errors import ConfigError
from hyperbooth.guidance import cfg, hm_cfg


@pytest.fixture(scope="module")
def alphas():
    return DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod


def test_v_target_matches_diffusers(alphas):
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    x0, noise = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(training_target("v_prediction", x0, noise, alphas, t), sched.get_velocity(x0, noise, t))
    assert training_target("epsilon", x0, noise, alphas, t) is noise
    with pytest.raises(ConfigError, match="'flow'"):
        training_target("flow", x0, noise, alphas, t)


def test_min_snr_weights(alphas):
    t = torch.tensor([10, 500, 990])
    s = snr(alphas, t)
    torch.testing.assert_close(loss_weights("epsilon", alphas, t, 5.0), torch.clamp(s, max=5.0) / s)
    torch.testing.assert_close(loss_weights("v_prediction", alphas, t, 5.0), torch.clamp(s, max=5.0) / (s + 1))
    assert torch.equal(loss_weights("epsilon", alphas, t, 0.0), torch.ones(3))
    # v-MSE x its weight equals eps-MSE x the eps weight: the two objectives agree
    x0, noise = torch.randn(3, 8), torch.randn(3, 8)
    a = alphas[t][:, None]
    pred_x0 = x0 + 0.1 * torch.randn(3, 8)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    pred_eps = (x_t - a.sqrt() * pred_x0) / (1 - a).sqrt()
    pred_v = a.sqrt() * pred_eps - (1 - a).sqrt() * pred_x0
    eps_loss = (pred_eps - noise).pow(2).mean(1) * loss_weights("epsilon", alphas, t, 5.0)
    v_loss = (pred_v - training_target("v_prediction", x0, noise, alphas, t)).pow(2).mean(1) * loss_weights("v_prediction", alphas, t, 5.0)
    torch.testing.assert_close(eps_loss, v_loss, rtol=1e-4, atol=1e-6)


def test_diffusion_loss_weighting():
    pred, target = torch.ones(2, 3), torch.zeros(2, 3)
    assert diffusion_loss(pred, target).item() == 1.0
    assert diffusion_loss(pred, target, torch.tensor([0.0, 2.0])).item() == 1.0


def test_cfg_limits():
    u, c = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(cfg(u, c, 1.0), c)
    torch.testing.assert_close(cfg(u, c, 0.0), u)
    torch.testing.assert_close(cfg(u, c, 3.0), u + 3 * (c - u))


def test_hm_cfg_limits():
    bu, bc, pc = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(hm_cfg(bu, bc, pc, w_base=5.0, w_pers=0.0), cfg(bu, bc, 5.0))
    torch.testing.assert_close(hm_cfg(bu, bc, pc, w_base=0.0, w_pers=4.0), cfg(bu, pc, 4.0))
    # an affine combination: a constant shift of every prediction shifts the result by the same constant
    torch.testing.assert_close(hm_cfg(bu + 1, bc + 1, pc + 1, 2.0, 3.0), hm_cfg(bu, bc, pc, 2.0, 3.0) + 1)
