
import pytest
import torch
from torch import nn

from salt.config import OptimConfig
from salt.losses import latent_targets, masked_l1, patchify, pixel_targets
from salt.optim import lr_at, make_optimizer, weight_decay_at


def test_pixel_targets_ignore_per_channel_affine_normalisation():
    clips = torch.rand(2, 3, 4, 16, 16) * 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1, 1) * 255
    torch.testing.assert_close(pixel_targets(clips, 2, 8), pixel_targets((clips - mean) / std, 2, 8), atol=1e-4, rtol=1e-4)
    t = pixel_targets(clips, 2, 8).view(2, 8, 128, 3)
    torch.testing.assert_close(t.mean(2), torch.zeros(2, 8, 3), atol=1e-5, rtol=0)


def test_raw_pixel_targets_are_the_patches_themselves():
    clips = torch.randn(2, 3, 4, 16, 16)
    raw = pixel_targets(clips, 2, 8, normalize=False)
    torch.testing.assert_close(raw, patchify(clips, 2, 8).flatten(-2))
    assert not torch.allclose(raw, pixel_targets(clips, 2, 8))


def test_patchify_follows_token_order():
    clips = torch.zeros(1, 3, 4, 16, 16)
    clips[0, :, 2:4, 8:16, 0:8] = 1.0  # t-block 1, h-block 1, w-block 0 -> token 1*4 + 1*2 + 0
    patches = patchify(clips, 2, 8)
    assert patches.shape == (1, 8, 128, 3)
    assert patches[0].sum(dim=(1, 2)).nonzero().flatten().tolist() == [6]


def test_masked_l1_ignores_padding_and_weighs_samples_equally():
    pred = torch.zeros(2, 3, 4)
    target = torch.ones(2, 3, 4)
    target[1] = 3.0
    valid = torch.tensor([[True, True, True], [True, False, False]])
    target[1, 1:] = 100.0  # padding: must not count
    assert masked_l1(pred, target, valid).item() == pytest.approx((1.0 + 3.0) / 2)


def test_latent_targets_are_parameter_free_layernorm():
    x = torch.randn(2, 5, 16) * 7 + 3
    y = latent_targets(x)
    torch.testing.assert_close(y.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(2, 5), atol=1e-3, rtol=0)


def test_schedules_follow_method_md():
    cfg = OptimConfig(steps=240_000)  # defaults are docs/method.md's numbers
    assert lr_at(0, cfg) == pytest.approx(2e-4)
    assert lr_at(10_000, cfg) == pytest.approx(6.25e-4)
    assert lr_at(5_000, cfg) == pytest.approx((2e-4 + 6.25e-4) / 2)
    assert lr_at(240_000, cfg) == pytest.approx(1e-6)
    mid = 10_000 + (240_000 - 10_000) // 2
    assert lr_at(mid, cfg) == pytest.approx((6.25e-4 + 1e-6) / 2)
    assert weight_decay_at(0, cfg) == pytest.approx(0.04)
    assert weight_decay_at(240_000, cfg) == pytest.approx(0.4)
    assert weight_decay_at(120_000, cfg) == pytest.approx(0.22)
    assert cfg.betas == (0.9, 0.95) and cfg.grad_clip == 0.02


def test_no_weight_decay_on_biases_and_1d_params():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    opt = make_optimizer([model], OptimConfig())
    decay, no_decay = opt.param_groups
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_pixel_loss_choice_reaches_the_teacher_step():
    """model.pixel_loss picks stage 1's distance: MSE squares the per-element error, and padding
    never counts; an unknown name is a config error naming the allowed ones."""
    from salt.config import ConfigError
    from salt.losses import masked_mse
    from salt.train.teacher import build_teacher_state
    from tests.conftest import tiny_config

    pred, target = torch.zeros(2, 3, 4), torch.full((2, 3, 4), 2.0)
    valid = torch.tensor([[True, True, False], [True, False, False]])
    target[0, 2] = 100.0  # padding: must not weigh in
    assert masked_l1(pred, target, valid).item() == 2.0 and masked_mse(pred, target, valid).item() == 4.0
    assert build_teacher_state(tiny_config("model.pixel_loss=mse")).distance is masked_mse
    assert build_teacher_state(tiny_config()).distance is masked_l1
    with pytest.raises(ConfigError, match="model.pixel_loss='huber': expected one of l1, mse"):
        tiny_config("model.pixel_loss=huber")
