import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from hyperbooth.diffusion import diffusion_loss, forward_process, loss_weights, training_scheduler, training_target
from hyperbooth.errors import ConfigError
from hyperbooth.guidance import cfg, hm_cfg


def _schedule(prediction_type="epsilon"):
    return DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)


def test_forward_process_and_targets_follow_the_formulas():
    x0, noise = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    t = torch.tensor([0, 500, 999])
    a = _schedule().alphas_cumprod[t].view(-1, 1, 1, 1)
    for prediction_type, expected in (("epsilon", noise), ("sample", x0), ("v_prediction", a.sqrt() * noise - (1 - a).sqrt() * x0)):
        x_t, target = forward_process(_schedule(prediction_type), x0, noise, t)
        torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * noise)
        torch.testing.assert_close(target, expected)
    with pytest.raises(ConfigError, match="'flow'"):
        training_target(_schedule("flow"), x0, noise, t)


def test_training_scheduler_reads_any_samplers_config():
    ddim = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1,
                         prediction_type="v_prediction")
    ddpm = training_scheduler(ddim.config)
    assert isinstance(ddpm, DDPMScheduler) and ddpm.config.prediction_type == "v_prediction"
    assert torch.equal(ddpm.alphas_cumprod, ddim.alphas_cumprod)  # the same noise schedule


def test_min_snr_weights():
    t = torch.tensor([10, 500, 990])
    alphas = _schedule().alphas_cumprod
    s = alphas[t] / (1 - alphas[t])
    torch.testing.assert_close(loss_weights(_schedule("epsilon"), t, 5.0), torch.clamp(s, max=5.0) / s)
    torch.testing.assert_close(loss_weights(_schedule("v_prediction"), t, 5.0), torch.clamp(s, max=5.0) / (s + 1))
    torch.testing.assert_close(loss_weights(_schedule("sample"), t, 5.0), torch.clamp(s, max=5.0))
    assert torch.equal(loss_weights(_schedule(), t, 0.0), torch.ones(3))
    # v-MSE x its weight equals eps-MSE x the eps weight: the two objectives agree
    x0, noise = torch.randn(3, 8), torch.randn(3, 8)
    a = alphas[t][:, None]
    pred_x0 = x0 + 0.1 * torch.randn(3, 8)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    pred_eps = (x_t - a.sqrt() * pred_x0) / (1 - a).sqrt()
    pred_v = a.sqrt() * pred_eps - (1 - a).sqrt() * pred_x0
    v_sched = _schedule("v_prediction")
    eps_loss = (pred_eps - noise).pow(2).mean(1) * loss_weights(_schedule("epsilon"), t, 5.0)
    v_loss = (pred_v - training_target(v_sched, x0, noise, t)).pow(2).mean(1) * loss_weights(v_sched, t, 5.0)
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
