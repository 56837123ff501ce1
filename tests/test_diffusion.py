import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from hyperbooth.diffusion import (
    diffusion_loss,
    forward_process,
    is_flow_matching,
    loss_weights,
    training_scheduler,
    training_target,
    training_timesteps,
)
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


def test_flow_matching_forward_process_target_and_timesteps_follow_the_formulas():
    """SD3's rectified flow: x_t = (1 − σ) x0 + σ ε, target v = ε − x0, t = σ·1000 on the shifted schedule."""
    flow = training_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    assert isinstance(flow, FlowMatchEulerDiscreteScheduler) and is_flow_matching(flow) and not is_flow_matching(_schedule())
    index = torch.tensor([0, 500, 999])
    t = training_timesteps(flow, index)
    u = (1000 - index.float()) / 1000  # the unshifted σ of index i (i = 0: σ = 1, pure noise)
    torch.testing.assert_close(t, 1000 * 3 * u / (1 + 2 * u))  # SD3's shift: σ' = sσ / (1 + (s − 1)σ)
    assert torch.equal(training_timesteps(_schedule(), index), index)  # DDPM: the draw itself, unchanged
    x0, noise = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    x_t, target = forward_process(flow, x0, noise, t)
    sigma = (t / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, (1 - sigma) * x0 + sigma * noise)
    torch.testing.assert_close(target, noise - x0)
    torch.testing.assert_close(x_t[0], noise[0])  # σ = 1: pure noise


def test_flow_matching_min_snr_weights_agree_with_the_eps_objective():
    flow = training_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    t = torch.tensor([50.0, 400.0, 950.0])
    sigma = t / 1000
    snr = ((1 - sigma) / sigma) ** 2
    torch.testing.assert_close(loss_weights(flow, t, 5.0), torch.clamp(snr, max=5.0) * sigma**2)
    assert torch.equal(loss_weights(flow, t, 0.0), torch.ones(3))
    # a velocity MSE × its weight equals the ε-MSE × Min-SNR's ε weight (min(SNR, γ) / SNR)
    x0, noise = torch.randn(3, 8), torch.randn(3, 8)
    s = sigma[:, None]
    x_t = (1 - s) * x0 + s * noise
    pred_v = training_target(flow, x0, noise, t) + 0.1 * torch.randn(3, 8)
    pred_eps = x_t + (1 - s) * pred_v
    v_loss = (pred_v - (noise - x0)).pow(2).mean(1) * loss_weights(flow, t, 5.0)
    eps_loss = (pred_eps - noise).pow(2).mean(1) * torch.clamp(snr, max=5.0) / snr
    torch.testing.assert_close(v_loss, eps_loss, rtol=1e-4, atol=1e-6)


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


def test_min_snr_is_refused_on_a_flow_matching_schedule():
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from hyperbooth.diffusion import check_min_snr
    from hyperbooth.errors import ConfigError

    check_min_snr(DDPMScheduler(), 5.0)  # DDPM-type: fine
    check_min_snr(FlowMatchEulerDiscreteScheduler(shift=3.0), 0.0)  # flow matching, unweighted: fine
    with pytest.raises(ConfigError, match="min_snr_gamma=5: .*flow matching.*set min_snr_gamma=0"):
        check_min_snr(FlowMatchEulerDiscreteScheduler(shift=3.0), 5.0)
