import pytest
import torch

from salt.models import attention as attention_module
from salt.models.attention import attention, packed_attention, resolve_backend, sdpa_block_diagonal
from salt.models.predictor import Predictor
from salt.models.vit import Rope3d, VideoViT


def test_encoder_sizes_match_method_md():
    expected = {"vit_b": 86e6, "vit_l": 303e6, "vit_h": 632e6, "vit_g": 1.01e9, "vit_G": 1.84e9}
    for name, params in expected.items():
        with torch.device("meta"):
            model = VideoViT(name, frames=16, crop_size=224, patch_size=16, tubelet=2)
        count = sum(p.numel() for p in model.parameters())
        assert abs(count - params) / params < 0.03, (name, count)
        assert model.grid == (8, 14, 14) and model.num_tokens == 1568


def test_predictor_size_matches_method_md():
    with torch.device("meta"):
        pred = Predictor(encoder_width=1024, out_dim=1024, grid=(8, 14, 14), width=384, depth=12, heads=12)
    count = sum(p.numel() for p in pred.parameters())
    assert 21e6 < count < 23e6, count
    assert torch.all(Predictor(encoder_width=8, out_dim=4, grid=(2, 2, 2), width=12, depth=1, heads=2).mask_token == 0)


def test_rope_scores_depend_only_on_relative_position():
    rope = Rope3d(head_dim=30, grid=(8, 8, 8))
    q, k = torch.randn(1, 1, 1, 30), torch.randn(1, 1, 1, 30)

    def score(i, j):
        cos, sin = rope.cos_sin(torch.tensor([[i, j]]))
        qi = rope.apply(q, cos[:, :, :1], sin[:, :, :1])
        kj = rope.apply(k, cos[:, :, 1:], sin[:, :, 1:])
        return (qi * kj).sum().item()

    # token index = t*64 + h*8 + w: the same (dt, dh, dw) offset at two places scores the same
    assert score(0 * 64 + 1 * 8 + 2, 1 * 64 + 3 * 8 + 3) == pytest.approx(score(2 * 64 + 4 * 8 + 1, 3 * 64 + 6 * 8 + 2), abs=1e-5)
    assert score(0, 9) != pytest.approx(score(0, 10), abs=1e-3)


def test_padding_never_changes_real_tokens():
    torch.manual_seed(0)
    model = VideoViT("vit_cpu_xs", frames=4, crop_size=32, patch_size=8, tubelet=2).eval()
    clips = torch.randn(1, 3, 4, 32, 32)
    idx = torch.tensor([[0, 3, 5, 17, 30]])
    plain = model(clips, idx, torch.ones_like(idx, dtype=torch.bool))
    padded_idx = torch.cat((idx, torch.zeros(1, 3, dtype=torch.long)), dim=1)
    valid = torch.tensor([[True] * 5 + [False] * 3])
    padded = model(clips, padded_idx, valid)
    torch.testing.assert_close(padded[:, :5], plain, rtol=1e-5, atol=1e-5)


def test_subset_keeps_true_positions():
    """Feeding tokens in another order permutes the output: positions come from indices."""
    torch.manual_seed(0)
    model = VideoViT("vit_cpu_xs", frames=4, crop_size=32, patch_size=8, tubelet=2).eval()
    clips = torch.randn(1, 3, 4, 32, 32)
    idx = torch.tensor([[1, 4, 9, 22]])
    out = model(clips, idx)
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(model(clips, idx[:, perm])[:, :], out[:, perm], rtol=1e-5, atol=1e-5)


def test_attention_backend_falls_back_to_sdpa_on_cpu():
    assert resolve_backend("auto", "cpu") == "sdpa"
    with pytest.raises(RuntimeError, match="xformers does not run on device 'cpu'"):
        resolve_backend("xformers", "cpu")
    with pytest.raises(ValueError, match="model.attention='flash'"):
        resolve_backend("flash", "cpu")


def padded_batch(lengths: list[int], heads: int = 2, head_dim: int = 8) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    n = max(lengths)
    valid = torch.arange(n)[None] < torch.tensor(lengths)[:, None]
    q, k, v = (torch.randn(len(lengths), heads, n, head_dim, requires_grad=True) for _ in range(3))
    return q, k, v, valid


def test_packed_variable_length_attention_equals_the_padded_path():
    """The packing xformers' block-diagonal kernel is fed (real tokens only, samples kept apart) gives the
    padded SDPA path's outputs and gradients at every real token. xformers has no CPU kernel, so the
    packed sequence goes through the SDPA reference of the same block-diagonal contract."""
    q, k, v, valid = padded_batch([5, 17, 11, 1])
    padded = attention(q, k, v, valid, backend="sdpa")
    packed = packed_attention(q, k, v, valid, kernel=sdpa_block_diagonal)
    real = valid[:, None, :, None].expand_as(padded)
    torch.testing.assert_close(packed[real], padded[real], rtol=1e-5, atol=1e-6)
    assert torch.all(packed[~real] == 0)
    weights = torch.randn_like(padded) * real  # a loss that, like training, reads real tokens only
    grads_padded = torch.autograd.grad((padded * weights).sum(), (q, k, v))
    grads_packed = torch.autograd.grad((packed * weights).sum(), (q, k, v))
    for a, b in zip(grads_padded, grads_packed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_training_takes_the_packed_path_where_xformers_works(monkeypatch):
    """With xformers reported working, every masked forward of encoder and predictor goes through the
    packed path (counted), and the loss and gradients equal the SDPA run's."""
    from salt.config import MaskConfig
    from salt.masking import collate_masks, sample_masks
    from salt.train.loop import masked_prediction_loss

    grid = (2, 4, 4)
    masks = collate_masks([sample_masks(MaskConfig().generators, grid, seed=0, key=f"k{i}", view=0) for i in range(3)])
    clips, targets = torch.randn(3, 3, 4, 32, 32), torch.randn(3, 32, 16)

    def loss_and_grads(backend: str):
        torch.manual_seed(0)
        encoder = VideoViT("vit_cpu_xs", frames=4, crop_size=32, patch_size=8, tubelet=2, attention_backend=backend)
        predictor = Predictor(encoder_width=64, out_dim=16, grid=grid, width=32, depth=2, heads=2, attention_backend=backend)
        loss = masked_prediction_loss(encoder, predictor, clips, masks, targets)
        return loss, torch.autograd.grad(loss, [*encoder.parameters(), *predictor.parameters()])

    reference = loss_and_grads("sdpa")
    calls = []

    def kernel(*args):
        calls.append(args[-1])
        return sdpa_block_diagonal(*args)

    monkeypatch.setattr(attention_module, "xformers_works", lambda device_type: True)
    monkeypatch.setattr(attention_module, "xformers_block_diagonal", kernel)
    packed = loss_and_grads("auto")
    assert len(calls) == 2 * (3 + 2)  # two masks x (encoder depth 3 + predictor depth 2)
    torch.testing.assert_close(packed[0], reference[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(packed[1], reference[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
