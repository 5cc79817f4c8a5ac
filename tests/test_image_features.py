"""Encoder feature sets for the drift loss, MAE pretraining, and the folded feature-space loss."""
import torch

from drift_policy.drift import drift_loss
from drift_policy.image.encoder import ResNetEncoder, feature_sets, pretrain_mae, random_patch_mask
from drift_policy.image.loss import feature_drift_loss


def test_encoder_stage_shapes_and_feature_sets():
    enc = ResNetEncoder(1, (8, 16, 32))
    maps = enc(torch.randn(3, 1, 28, 28))
    assert [tuple(m.shape) for m in maps] == [(3, 8, 28, 28), (3, 16, 14, 14), (3, 32, 7, 7)]
    fs = feature_sets(maps, stages=(0, 1, 2), loc_stages=(1, 2), patches=(2, 4), max_groups=64)
    assert fs["s0.mean"].shape == (3, 1, 8) and fs["s2.std"].shape == (3, 1, 32)
    assert fs["s2.loc"].shape == (3, 49, 32)
    assert fs["s1.p2m"].shape == (3, 49, 16) and fs["s2.p4s"].shape == (3, 1, 32)
    # sets with more than max_groups problems per image are left out
    assert "s1.loc" not in fs and "s0.p2m" not in fs and "s0.p4m" in fs
    assert "s1.loc" in feature_sets(maps, (1,), (1,), (2,), max_groups=None)


def test_feature_values_are_the_stated_statistics():
    f = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    fs = feature_sets([f], stages=(0,), loc_stages=(0,), patches=(2,), max_groups=None)
    torch.testing.assert_close(fs["s0.mean"][:, 0], f.mean(dim=(2, 3)))
    torch.testing.assert_close(fs["s0.std"][:, 0], f.flatten(2).std(dim=2))
    torch.testing.assert_close(fs["s0.loc"][1, 4 * 1 + 2], f[1, :, 1, 2])        # location (1, 2)
    top_right = f[0, :, 0:2, 2:4].flatten(1)                                      # 2x2 patch index 1
    torch.testing.assert_close(fs["s0.p2m"][0, 1], top_right.mean(1))
    torch.testing.assert_close(fs["s0.p2s"][0, 1], top_right.std(1, unbiased=False), rtol=1e-6, atol=1e-6)


def test_mask_ratio_and_mae_pretraining_reduces_reconstruction_error():
    m = random_patch_mask(4, 28, 28, 4, 0.5, torch.Generator().manual_seed(0))
    assert m.shape == (4, 1, 28, 28)
    assert abs(m.mean().item() - round(0.5 * 49) / 49) < 1e-6
    g = torch.Generator().manual_seed(0)
    # structured images: horizontal stripes at a random phase -> masked parts are predictable from the rest
    phase = torch.randint(0, 4, (256,), generator=g)
    rows = (torch.arange(16)[None] + phase[:, None]) % 4 < 2
    x = rows.float().mul(2).sub(1)[:, None, :, None].expand(256, 1, 16, 16).contiguous()
    torch.manual_seed(0)
    stats = pretrain_mae(ResNetEncoder(1, (8, 16)), x, minutes=0, max_steps=60, batch=32, lr=3e-3, log=None)
    assert stats["steps"] == 60
    assert stats["loss_last50"] < 0.5 * stats["loss_first"], stats


def test_folded_loss_equals_drift_loss_on_folded_groups_and_grads_reach_generator_only():
    torch.manual_seed(0)
    G, N, P, M, K, D = 2, 5, 6, 3, 4, 3
    gen = torch.randn(G, N, K, D, requires_grad=True)
    pos, unc = torch.randn(G, P, K, D), torch.randn(M, K, D)
    w = torch.tensor([0.0, 1.5])
    total, per, _ = feature_drift_loss({"f": gen}, {"f": pos}, {"f": unc}, w)
    # manual fold: group (g, k) sees gen[g, :, k], pos[g, :, k], all M unconditional negatives with weight w[g]
    ref, _ = drift_loss(gen.permute(0, 2, 1, 3).reshape(G * K, N, D), pos.permute(0, 2, 1, 3).reshape(G * K, P, D),
                        unc.permute(1, 0, 2).repeat(G, 1, 1), neg_weight=w.repeat_interleave(K)[:, None].expand(G * K, M))
    torch.testing.assert_close(per["f"], ref.mean())
    total.backward()
    assert gen.grad.abs().sum() > 0


def test_drift_through_frozen_encoder_moves_samples_toward_the_data():
    """A few gradient steps on samples (no generator) through the encoder's features lower the feature gap."""
    torch.manual_seed(0)
    enc = ResNetEncoder(1, (8, 16)).requires_grad_(False)
    data = torch.zeros(64, 1, 8, 8) - 1
    data[:, :, 2:6, 2:6] = 1.0                                   # a bright square
    x = torch.randn(32, 1, 8, 8).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05)

    def gap():
        with torch.no_grad():
            return (enc(x)[1].mean(0) - enc(data)[1].mean(0)).norm().item()

    before = gap()
    for _ in range(120):
        fg = feature_sets(enc(x), (0, 1), (1,), (2,), None)
        fp = feature_sets(enc(data), (0, 1), (1,), (2,), None)
        fg = {k: v.unsqueeze(0) for k, v in fg.items()}
        fp = {k: v.unsqueeze(0) for k, v in fp.items()}
        loss, _, _ = feature_drift_loss(fg, fp, None, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert gap() < 0.5 * before, (before, gap())
    assert ((x.detach() - data[:32]).abs().mean()) < 1.0          # pixel noise (mean |.| ~1.3) reduced
