import pytest
import torch
from torch import nn

from hyperbooth.errors import ConfigError, LoRAFileError
from hyperbooth.lora import (
    DEFAULT_TEXT_ENCODER_TARGETS,
    DEFAULT_UNET_TARGETS,
    LoRAInjector,
    LoRAWeights,
    apply_lora,
    find_targets,
    target_shapes,
)
from hyperbooth.tiny import tiny_unet

TARGETS = DEFAULT_UNET_TARGETS + ("proj_in", "proj_out")


@pytest.fixture(scope="module")
def unet():
    model = tiny_unet(seed=0)
    model.requires_grad_(False)
    return model


def _inputs(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.tensor([10 * (i + 1) for i in range(batch)])
    cond = torch.randn(batch, 5, 32, generator=g)
    return x_t, t, cond


def _lora(unet, n, rank=2, seed=0, zero_B=False):
    w = LoRAWeights.random(target_shapes(unet, TARGETS), rank=rank, num_subjects=n, std=0.3, generator=torch.Generator().manual_seed(seed))
    return w.scaled(0.0) if zero_B else w


def _eps(unet, x_t, t, cond):
    return unet(x_t, t, encoder_hidden_states=cond).sample


def test_targets_cover_self_cross_attention_and_convs(unet):
    targets = find_targets(unet, TARGETS)
    assert any(n.endswith("attn1.to_q") for n in targets) and any(n.endswith("attn2.to_k") for n in targets)
    assert any(isinstance(m, nn.Conv2d) for m in targets.values())
    assert all(isinstance(m, (nn.Linear, nn.Conv2d)) for m in targets.values())
    with pytest.raises(ConfigError, match="conv_in"):
        find_targets(unet, ["conv_in"])
    with pytest.raises(ConfigError, match="no module"):
        find_targets(unet, ["nothing_like_this"])


def test_zero_B_gives_base_output(unet):
    x_t, t, cond = _inputs(3)
    base = _eps(unet, x_t, t, cond)
    with apply_lora(unet, _lora(unet, 3, zero_B=True)):
        out = _eps(unet, x_t, t, cond)
    torch.testing.assert_close(out, base, rtol=0, atol=0)


def test_per_sample_batch_equals_separate_runs(unet):
    x_t, t, cond = _inputs(3)
    w = _lora(unet, 3)
    with apply_lora(unet, w, mode="per_sample"):
        batched = _eps(unet, x_t, t, cond)
    for i in range(3):
        with apply_lora(unet, w.select(i), mode="shared"):
            single = _eps(unet, x_t[i : i + 1], t[i : i + 1], cond[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], single, rtol=1e-4, atol=1e-5)
    base = _eps(unet, x_t, t, cond)
    assert (batched - base).abs().max() > 1e-3  # the LoRA does something


def test_rows_without_lora_match_base_and_repeat_rule(unet):
    x_t, t, cond = _inputs(4)
    w = _lora(unet, 2)
    base = _eps(unet, x_t, t, cond)
    with apply_lora(unet, w, rows=[-1, 1, -1, 0]):
        mixed = _eps(unet, x_t, t, cond)
    torch.testing.assert_close(mixed[[0, 2]], base[[0, 2]], rtol=1e-5, atol=1e-6)
    with apply_lora(unet, w, rows=[0, 1, 0, 1]):
        explicit = _eps(unet, x_t, t, cond)
    with apply_lora(unet, w):  # batch 4 = 2 x N: row i uses subject i mod 2
        implicit = _eps(unet, x_t, t, cond)
    torch.testing.assert_close(explicit, implicit, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[1], explicit[1], rtol=1e-4, atol=1e-5)


# several subjects and one subject on the LoRA rows, in slice, gather and all-rows layouts
LAYOUTS = [[-1, -1, 0, 1], [0, -1, -1, 1], [-1, 1, -1, -1], [-1, -1, -1, -1], [-1, -1, 1, 1], [1, -1, 1, -1], [1, 1, 1, 1], [0, 1, 1, 0]]


@pytest.mark.parametrize("rows", LAYOUTS)
def test_rows_without_lora_skip_the_matmuls_and_match_separate_runs(unet, rows):
    """Base rows are left out of the LoRA matmuls (a slice when the LoRA rows are contiguous, a gather otherwise);
    with gradients on, in ``no_grad`` and in ``inference_mode`` every row equals its own separate run."""
    x_t, t, cond = _inputs(4)
    w = _lora(unet, 2)
    expected = []
    for i, r in enumerate(rows):
        one = (x_t[i : i + 1], t[i : i + 1], cond[i : i + 1])
        if r < 0:
            expected.append(_eps(unet, *one))
        else:
            with apply_lora(unet, w.select(r), mode="shared"):
                expected.append(_eps(unet, *one))
    expected = torch.cat(expected)
    for context in (torch.enable_grad, torch.no_grad, torch.inference_mode):
        with context(), apply_lora(unet, w, rows=rows):
            out = _eps(unet, x_t, t, cond)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rows", [r for r in LAYOUTS if max(r) >= 0])
def test_gradients_with_rows_without_lora_equal_those_of_separate_runs(unet, rows):
    """Every layout gives the factors the gradients of per-row runs (zero for a subject no row uses)."""
    x_t, t, cond = _inputs(4)
    base = _lora(unet, 2)

    def grads(batched: bool):
        leaves = {n: (layer.A.clone().requires_grad_(), layer.B.clone().requires_grad_()) for n, layer in base.items()}
        w = LoRAWeights.from_factors({n: a for n, (a, _) in leaves.items()}, {n: b for n, (_, b) in leaves.items()}, 2.0)
        if batched:
            with apply_lora(unet, w, rows=rows):
                loss = _eps(unet, x_t, t, cond).pow(2).sum()
        else:
            loss = 0
            for i, r in enumerate(rows):
                if r >= 0:
                    with apply_lora(unet, w.select(r), mode="shared"):
                        loss = loss + _eps(unet, x_t[i : i + 1], t[i : i + 1], cond[i : i + 1]).pow(2).sum()
        loss.backward()
        return {n: (a.grad, b.grad) for n, (a, b) in leaves.items()}

    batched, separate = grads(True), grads(False)
    for name, (ga, gb) in separate.items():
        # float32 sums in another order (one batch vs. per-row runs; the kernels' split depends on the thread count):
        # an absolute error of 1e-4 of the gradient's own scale, far below what a wrong row would give
        torch.testing.assert_close(batched[name][0], ga, rtol=1e-3, atol=1e-4 * float(ga.abs().max()) + 1e-8)
        torch.testing.assert_close(batched[name][1], gb, rtol=1e-3, atol=1e-4 * float(gb.abs().max()) + 1e-8)
    assert all(gb.abs().sum() > 0 for _, gb in separate.values())


def test_disabled_switches_hooked_lora_off_for_any_batch(unet):
    x_t, t, cond = _inputs(3)
    w = _lora(unet, 1)
    base = _eps(unet, x_t, t, cond)
    injector = LoRAInjector(unet)
    with injector.apply(w, mode="per_sample", rows=[-1, 0, 0]):
        on = _eps(unet, x_t, t, cond)
        with injector.disabled():  # a batch of another size than the rows: the base model's output
            off = _eps(unet, x_t[:2], t[:2], cond[:2])
        again = _eps(unet, x_t, t, cond)
    torch.testing.assert_close(off, base[:2], rtol=1e-5, atol=1e-6)
    assert (on[1:] - base[1:]).abs().max() > 1e-3
    torch.testing.assert_close(again, on, rtol=1e-6, atol=1e-7)  # on again after the block
    with injector.apply(w, mode="merged"):
        with pytest.raises(ConfigError, match="merged"):
            with injector.disabled():
                pass


def test_merged_equals_unmerged_and_restores_bit_exactly(unet):
    x_t, t, cond = _inputs(2)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    w = _lora(unet, 1)
    with apply_lora(unet, w, mode="shared"):
        hooked = _eps(unet, x_t, t, cond)
    with apply_lora(unet, w, mode="merged"):
        merged = _eps(unet, x_t, t, cond)
    torch.testing.assert_close(merged, hooked, rtol=1e-4, atol=1e-5)
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m._forward_hooks for m in unet.modules())


def test_restore_on_exception(unet):
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"):
        with apply_lora(unet, _lora(unet, 1), mode="merged"):
            raise RuntimeError("boom")
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    with pytest.raises(RuntimeError, match="boom"):
        with apply_lora(unet, _lora(unet, 1)):
            raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in unet.modules())


def test_scale_argument_scales_delta(unet):
    x_t, t, cond = _inputs(1)
    w = _lora(unet, 1)
    with apply_lora(unet, w, scale=0.5):
        a = _eps(unet, x_t, t, cond)
    with apply_lora(unet, w.scaled(0.5)):
        b = _eps(unet, x_t, t, cond)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradients_reach_factors_only(unet):
    x_t, t, cond = _inputs(2)
    w = _lora(unet, 2)
    leaves = {n: (layer.A.clone().requires_grad_(), layer.B.clone().requires_grad_()) for n, layer in w.items()}
    w = LoRAWeights.from_factors({n: a for n, (a, _) in leaves.items()}, {n: b for n, (_, b) in leaves.items()}, 2.0)
    with apply_lora(unet, w):
        _eps(unet, x_t, t, cond).pow(2).mean().backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a, _ in leaves.values())
    assert all(b.grad is not None and b.grad.abs().sum() > 0 for _, b in leaves.values())
    assert all(p.grad is None for p in unet.parameters())


def test_text_encoder_targets():
    from transformers import CLIPTextConfig, CLIPTextModel

    from hyperbooth.tiny import TINY_TEXT_CONFIG

    te = CLIPTextModel(CLIPTextConfig(vocab_size=100, **TINY_TEXT_CONFIG)).eval()
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    w = LoRAWeights.random(target_shapes(te, DEFAULT_TEXT_ENCODER_TARGETS), rank=2, num_subjects=2, std=0.3)
    base = te(ids).last_hidden_state
    with apply_lora(te, w):
        both = te(ids).last_hidden_state
    with apply_lora(te, w.select(1), mode="shared"):
        second = te(ids[1:]).last_hidden_state
    assert (both - base).abs().max() > 1e-3
    torch.testing.assert_close(both[1:], second, rtol=1e-4, atol=1e-5)


def test_bad_uses_are_named(unet):
    w = _lora(unet, 2)
    x_t, t, cond = _inputs(3)
    with pytest.raises(ConfigError, match="mode 'merged' takes one subject"):
        with apply_lora(unet, w, mode="merged"):
            pass
    with pytest.raises(ConfigError, match="unknown LoRA mode 'fused'"):
        with apply_lora(unet, w, mode="fused"):
            pass
    with pytest.raises(ConfigError, match="not a multiple"):
        with apply_lora(unet, w):
            _eps(unet, x_t, t, cond)
    with pytest.raises(ConfigError, match=r"\[-1, 1\]"):
        with apply_lora(unet, w, rows=[0, 2, -1]):
            pass
    injector = LoRAInjector(unet)
    with pytest.raises(ConfigError, match="already applied"):
        with injector.apply(w):
            with injector.apply(w):
                pass
    other = LoRAWeights.random({"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (31, 32)}, rank=1)
    with pytest.raises(LoRAFileError, match="attn1.to_q.*d_in=32.*d_in=31"):
        with apply_lora(unet, other):
            pass
    missing = LoRAWeights.random({"down_blocks.9.to_q": (32, 32)}, rank=1)
    with pytest.raises(LoRAFileError, match="down_blocks.9.to_q"):
        with apply_lora(unet, missing):
            pass
