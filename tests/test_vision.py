"""Image observations: ResNet-18/GroupNorm/spatial-softmax encoder, image data loading, image Push-T env renders."""
import numpy as np
import pytest
import torch
import zarr
from torch import nn

from drift_policy.data.pusht import load_pusht_image
from drift_policy.envs import PushTImageEnv
from drift_policy.errors import DatasetError
from drift_policy.models.resnet import RESNET_PRESETS, VISION_BACKBONES, ImageEncoder, MultiImageEncoder, ResNet18GN, ShallowConvGN, SpatialSoftmax

# Render match (mean absolute difference per frame, 0..255 scale), measured on 799 stored states (every
# episode's first frame plus 600 spread over the store): mean 0.077, median 0.079, 90th percentile 0.12, max
# 0.16. Moving the block by 3 px (0.56 px at 96x96) raises the mean to 0.43, so the thresholds sit in between.
RENDER_MAD_MEAN_MAX = 0.15
RENDER_MAD_P90_MAX = 0.2


def _images(b, h=96, w=96, seed=0):
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# -- encoder -------------------------------------------------------------------------------------------------
def test_resnet18_trunk_param_count():
    n = sum(p.numel() for p in ResNet18GN(**RESNET_PRESETS["resnet18"]).parameters())
    assert n == 11_176_512  # torchvision's resnet18 without fc (GroupNorm has BatchNorm's affine params)
    n_half = sum(p.numel() for p in ResNet18GN(**RESNET_PRESETS["resnet18_half"]).parameters())
    n_tiny = sum(p.numel() for p in ResNet18GN(**RESNET_PRESETS["tiny"]).parameters())
    assert n_tiny < n_half < n / 3


def test_encoder_shape_dtype_and_groupnorm_only():
    enc = ImageEncoder(preset="resnet18", feature_dim=64)
    norms = [m for m in enc.modules() if isinstance(m, nn.GroupNorm)]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in enc.modules())
    assert len(norms) == 1 + 2 * 8 + 3  # stem, two per block, three projection shortcuts
    assert all(m.num_groups == m.num_channels // 16 for m in norms)
    assert enc.pool.height == enc.pool.width == 3  # 84x84 crop -> 3x3 map, as in Diffusion Policy
    enc.eval()
    with torch.no_grad():
        out = enc(_images(2))
        out_f = enc(_images(2).float())  # float in 0..255 gives the same features
    assert out.shape == (2, 64) and out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, out_f)


def test_gradients_reach_every_parameter():
    enc = ImageEncoder(preset="tiny", feature_dim=16).train()
    enc(_images(4), generator=torch.Generator().manual_seed(0)).square().sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_spatial_softmax_range_and_bright_spot():
    pool = SpatialSoftmax(8, 5, 6, num_kp=32)
    kp = pool(torch.randn(3, 8, 5, 6) * 10)
    assert kp.shape == (3, 64) and kp.abs().max() <= 1.0
    h, w = 7, 9
    spot = SpatialSoftmax(1, h, w, num_kp=None, temperature=0.01)
    for r, c in ((0, 0), (3, 5), (6, 8), (2, 1)):
        x = torch.zeros(1, 1, h, w)
        x[0, 0, r, c] = 1.0
        torch.testing.assert_close(spot(x)[0], torch.tensor([-1 + 2 * c / (w - 1), -1 + 2 * r / (h - 1)]),
                                   atol=1e-3, rtol=0)
    with pytest.raises(ValueError):
        spot(torch.zeros(1, 1, h + 1, w))


def _position_coded(b):
    """Float images whose pixel (i, j) holds 1000 i + j, so a crop's first pixel gives its offset."""
    i = torch.arange(96.0)[:, None] * 1000 + torch.arange(96.0)[None, :]
    return i.expand(b, 3, 96, 96).clone()


def test_random_crop_per_sample_and_centre_crop_in_eval():
    enc = ImageEncoder(preset="tiny")
    x = _position_coded(64)
    enc.train()
    out = enc.crop(x, torch.Generator().manual_seed(0))
    assert out.shape == (64, 3, 84, 84)
    top, left = (out[:, 0, 0, 0] // 1000).long(), (out[:, 0, 0, 0] % 1000).long()
    assert top.min() >= 0 and top.max() <= 12 and left.min() >= 0 and left.max() <= 12
    assert len(set(zip(top.tolist(), left.tolist()))) > 20  # independent offsets per sample
    for k in range(64):  # each crop is a contiguous window of its own image
        torch.testing.assert_close(out[k], x[k, :, top[k]:top[k] + 84, left[k]:left[k] + 84], rtol=0, atol=0)
    again = enc.crop(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, again, rtol=0, atol=0)  # reproducible with a generator
    enc.eval()
    centre = enc.crop(x)
    torch.testing.assert_close(centre, x[:, :, 6:90, 6:90], rtol=0, atol=0)
    imgs = _images(3)
    with torch.no_grad():
        torch.testing.assert_close(enc(imgs), enc(imgs), rtol=0, atol=0)


def test_keypoints_from_an_origin_do_not_move_with_the_crop():
    """``image_kp_origin``: a point of the stored frame reads the same from the origin whatever the crop's offset,
    in the frame's pixels over half its size; the point at the origin reads 0."""
    enc = ImageEncoder(preset="tiny")                        # 96x96 frames, 84x84 crops
    point, origin = torch.tensor([40.0, 55.0]), torch.tensor([[30.0, 60.0]])
    for top, left in ((0, 0), (12, 5), (6, 6), (3, 11)):
        kp = (point - torch.tensor([left, top])) / 83 * 2 - 1   # where the crop's spatial softmax puts the point
        got = enc.from_origin(torch.cat([kp, kp * 0 - 1]).view(1, 4), torch.tensor([top]), torch.tensor([left]), origin)
        torch.testing.assert_close(got[0, :2], torch.tensor([10 / 48, -5 / 48]))
        torch.testing.assert_close(got[0, 2:], (torch.tensor([left, top]) - origin[0]) / 48)   # the crop's corner
    enc.eval()                                               # the centre crop's offset, (6, 6)
    imgs, origin = _images(3), torch.tensor([[10.0, 20.0], [50.0, 50.0], [90.0, 3.0]])
    with torch.no_grad():
        want = enc.head(enc.from_origin(enc.keypoints(enc.scale(imgs[:, :, 6:90, 6:90])), torch.full((3,), 6),
                                        torch.full((3,), 6), origin))
        torch.testing.assert_close(enc(imgs, origin=origin), want, rtol=0, atol=0)
        assert not torch.allclose(enc(imgs, origin=origin), enc(imgs, origin=origin + 5))


def test_a_policy_with_keypoints_from_the_agent_reads_the_agent_into_its_image_features():
    from drift_policy.errors import ConfigError
    from drift_policy.normalizer import Normalizer
    from drift_policy.policies import DriftConfig, make_policy

    norm = Normalizer().fit("obs", torch.rand(50, 2) * 512).fit("action", torch.rand(50, 2) * 512)
    obs = {"obs": torch.rand(2, 2, 2) * 512, "image": _images(4).view(2, 2, 3, 96, 96)}
    moved = {**obs, "obs": obs["obs"] + 20}
    for origin, reads_agent in (({}, False), ({"image_kp_origin": (0, 1), "image_kp_scale": 96 / 512}, True)):
        torch.manual_seed(0)
        policy = make_policy(DriftConfig(backbone="tiny", obs_dim=2, image_keys=("image",), vision_backbone="tiny",
                                         **origin), norm).eval()
        with torch.no_grad():
            assert torch.equal(policy.encode_images(obs), policy.encode_images(moved)) != reads_agent
    for bad in ({"image_kp_origin": (0, 1)}, {"image_kp_origin": (0,), "image_kp_scale": 1.0},
                {"image_kp_origin": (0, 2), "image_kp_scale": 1.0}):
        with pytest.raises(ConfigError, match="image_kp_origin"):
            DriftConfig(obs_dim=2, image_keys=("image",), **bad)
    with pytest.raises(ConfigError, match="needs a camera"):
        DriftConfig(obs_dim=2, image_kp_origin=(0, 1), image_kp_scale=1.0)


def test_push_t_frames_show_the_agent_where_image_kp_scale_puts_it(pusht_zarr):
    """The Push-T image recipe's camera (policy.image_kp_scale = 96 / 512): the agent's disc is drawn centred on
    pixel index obs * 96 / 512 - 0.5, the mapping the keypoints-from-the-agent lever relies on."""
    root = zarr.open(str(pusht_zarr), "r")
    seen = 0
    for i in range(0, 25650, 1003):
        frame, agent = np.asarray(root["data/img"][i]), np.asarray(root["data/state"][i, :2])
        ys, xs = np.nonzero((frame[..., 2] > 200) & (frame[..., 0] < 120))          # the agent's blue disc
        if len(xs) < 20:                      # partly hidden (at the frame's edge, or drawn under the block)
            continue
        seen += 1
        np.testing.assert_allclose([xs.mean(), ys.mean()], agent * 96 / 512 - 0.5, atol=0.5)
    assert seen >= 15


def test_bad_input_raises():
    enc = ImageEncoder(preset="tiny")
    for bad in (torch.zeros(2, 3, 84, 84, dtype=torch.uint8), torch.zeros(3, 96, 96, dtype=torch.uint8),
                torch.zeros(2, 1, 96, 96, dtype=torch.uint8), torch.zeros(2, 3, 96, 96, dtype=torch.int32)):
        with pytest.raises(ValueError):
            enc(bad)
    with pytest.raises(ValueError):
        ImageEncoder(image_shape=(3, 64, 64), crop_shape=(84, 84), preset="tiny")
    with pytest.raises(ValueError):
        ImageEncoder(preset="resnet50")


def test_multi_image_encoder_robomimic_cameras():
    keys = ["agentview_image", "robot0_eye_in_hand_image"]
    enc = MultiImageEncoder(keys, image_shape=(3, 84, 84), crop_shape=(76, 76), preset="tiny", feature_dim=32)
    assert enc.out_dim == 64
    a, b = (enc.encoders[k] for k in keys)
    assert a is not b and a.trunk.stem[0].weight.data_ptr() != b.trunk.stem[0].weight.data_ptr()
    batch = {k: _images(5, 84, 84, seed=i) for i, k in enumerate(keys)}
    enc.eval()
    with torch.no_grad():
        out = enc(batch)
        assert out.shape == (5, 64)
        torch.testing.assert_close(out[:, :32], a(batch[keys[0]]))
        torch.testing.assert_close(out[:, 32:], b(batch[keys[1]]))
    with pytest.raises(ValueError):
        enc({keys[0]: batch[keys[0]]})


# -- the cheaper encoders and the training levers (issue 39) ---------------------------------------------------
@pytest.mark.parametrize("hw", [(84, 84), (76, 76), (96, 96), (61, 90)])
def test_shallow_trunk_shapes_and_groupnorm_only(hw):
    trunk = ShallowConvGN()
    out = trunk(torch.zeros(2, 3, *hw))
    assert out.shape == (2, trunk.out_channels, *trunk.output_hw(*hw))
    assert trunk.output_hw(84, 84) == (11, 11)                  # robomimic's ShallowConv map at 84x84
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in trunk.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in trunk.modules()) == 4


@pytest.mark.parametrize("preset", ["resnet18_half", "shallow"])
def test_cheaper_encoder_shapes_and_size(preset):
    enc = ImageEncoder(preset=preset, feature_dim=64).eval()
    full = sum(p.numel() for p in ImageEncoder(preset="resnet18").parameters())
    assert sum(p.numel() for p in enc.parameters()) < full / 3
    h, w = enc.trunk.output_hw(84, 84)
    assert (enc.pool.height, enc.pool.width) == (h, w)
    with torch.no_grad():
        out = enc(_images(3))
    assert out.shape == (3, 64) and out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("preset", VISION_BACKBONES)
def test_train_and_eval_modes_give_the_same_features_but_for_the_crop(preset):
    """GroupNorm has no running statistics, so the mode changes only the crop: without a crop, or with the
    centre crop given to the train-mode network, train and eval features are equal; the random crop differs."""
    torch.manual_seed(0)
    imgs = _images(4)
    no_crop = ImageEncoder(crop_shape=None, preset=preset)
    with torch.no_grad():
        torch.testing.assert_close(no_crop.train()(imgs), no_crop.eval()(imgs), rtol=0, atol=0)
        enc = ImageEncoder(preset=preset)
        want = enc.eval()(imgs)                                           # centre crop
        enc.train()
        torch.testing.assert_close(enc.features(enc.scale(imgs[:, :, 6:90, 6:90])), want, rtol=0, atol=0)
        random = enc(imgs, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(random, want)


def test_channels_last_is_the_same_function_and_bf16_autocast_is_close():
    torch.manual_seed(0)
    enc = ImageEncoder(preset="tiny").eval()
    imgs = _images(4)
    with torch.no_grad():
        want = enc(imgs)
        enc.set_channels_last(True)
        assert enc.trunk.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(enc(imgs), want, rtol=1e-4, atol=1e-5)
        enc.set_channels_last(False)
        multi = MultiImageEncoder(["image"], preset="tiny")
        multi.encoders["image"].load_state_dict(enc.state_dict())
        multi.eval().set_autocast(torch.bfloat16)
        assert multi.encoders["image"].channels_last
        low = multi({"image": imgs})
    assert low.dtype == torch.float32
    assert not torch.equal(low, want)                                     # the trunk did run in bfloat16
    torch.testing.assert_close(low, want, rtol=0.05, atol=0.05 * float(want.abs().max()))


# -- data ----------------------------------------------------------------------------------------------------
def test_load_pusht_image_real_store(pusht_zarr):
    d = load_pusht_image(pusht_zarr, progress=False)
    n = 25650
    assert d["image"].shape == (n, 3, 96, 96) and d["image"].dtype == np.uint8
    assert d["obs"].shape == (n, 2) and d["obs"].dtype == np.float32
    assert d["action"].shape == (n, 2) and d["action"].dtype == np.float32
    assert d["episode_ends"].dtype == np.int64 and d["episode_ends"][-1] == n
    root = zarr.open(str(pusht_zarr), "r")
    np.testing.assert_array_equal(d["obs"], np.asarray(root["data/state"][:, :2]))
    # the side array: the keypoints task's observation of each step, which the image policy never sees
    from drift_policy.data.pusht import load_pusht_lowdim
    from drift_policy.data.windows import SIDE_KEYS

    assert "state" in SIDE_KEYS
    np.testing.assert_array_equal(d["state"], load_pusht_lowdim(pusht_zarr)["obs"])
    for i in (0, 160, 161, 12345, n - 1):  # includes a store chunk boundary (161 frames per chunk)
        np.testing.assert_array_equal(d["image"][i].transpose(1, 2, 0).astype(np.float32), root["data/img"][i])


def _write_image_store(path, n=23, img=None):
    root = zarr.open(str(path), mode="w")
    rng = np.random.default_rng(0)
    root["data/state"] = rng.random((n, 5)).astype(np.float32)
    root["data/keypoint"] = rng.random((n, 9, 2)).astype(np.float32)
    root["data/action"] = rng.random((n, 2)).astype(np.float32)
    root["data/img"] = (rng.integers(0, 256, (n, 8, 10, 3)).astype(np.float32) if img is None else img)
    root["meta/episode_ends"] = np.array([9, n], dtype=np.int64)
    return root


def test_load_pusht_image_chunks_and_validation(tmp_path):
    root = _write_image_store(tmp_path / "ok.zarr")
    d = load_pusht_image(tmp_path / "ok.zarr", progress=False, chunk_frames=5)
    np.testing.assert_array_equal(d["image"], np.asarray(root["data/img"][:]).transpose(0, 3, 1, 2))
    assert d["image"].shape == (23, 3, 8, 10)
    bad = np.zeros((23, 8, 10, 3), np.float32)
    bad[17, 2, 3, 1] = np.nan
    _write_image_store(tmp_path / "nan.zarr", img=bad)
    with pytest.raises(DatasetError, match="NaN"):
        load_pusht_image(tmp_path / "nan.zarr", progress=False, chunk_frames=5)
    bad[17, 2, 3, 1] = 300.0
    _write_image_store(tmp_path / "range.zarr", img=bad)
    with pytest.raises(DatasetError, match="0..255"):
        load_pusht_image(tmp_path / "range.zarr", progress=False)
    _write_image_store(tmp_path / "shape.zarr", img=np.zeros((23, 8, 10), np.float32))
    with pytest.raises(DatasetError, match="shape"):
        load_pusht_image(tmp_path / "shape.zarr", progress=False)
    with pytest.raises(DatasetError, match="not found"):
        load_pusht_image(tmp_path / "missing.zarr", progress=False)


# -- env -----------------------------------------------------------------------------------------------------
def test_image_env_observation_dict():
    env = PushTImageEnv(max_steps=3)
    obs, info = env.reset(seed=0)
    assert set(obs) == {"obs", "image"}
    assert obs["obs"].shape == (2,) and obs["obs"].dtype == np.float32
    assert obs["image"].shape == (3, 96, 96) and obs["image"].dtype == np.uint8
    assert env.observation_space.contains(obs)
    np.testing.assert_allclose(obs["obs"], info["state"][:2], atol=1e-4)
    for t in range(3):
        obs, reward, terminated, truncated, info = env.step(np.array([256.0, 256.0]))
        assert obs["image"].shape == (3, 96, 96) and obs["image"].dtype == np.uint8
        np.testing.assert_allclose(obs["obs"], info["state"][:2], atol=1e-4)
    assert truncated and info["elapsed_steps"] == 3 and "coverage" in info
    env.close()


def _render_mad(env, states, frames):
    mad = []
    for s, frame in zip(states, frames):
        obs, _ = env.reset(options={"reset_to_state": s})
        mad.append(np.abs(obs["image"].transpose(1, 2, 0).astype(np.float32) - frame).mean())
    return np.array(mad)


def test_renders_match_dataset_frames(pusht_zarr):
    root = zarr.open(str(pusht_zarr), "r")
    ends = np.asarray(root["meta/episode_ends"][:])
    idx = np.linspace(0, ends[-1] - 1, 64).round().astype(int)  # 64 frames from 64 different episodes
    assert len(np.unique(np.searchsorted(ends, idx, side="right"))) >= 50
    frames = root["data/img"].get_orthogonal_selection((idx,))          # [64, 96, 96, 3] float32
    states = np.asarray(root["data/state"].get_orthogonal_selection((idx,)), dtype=np.float64)
    env = PushTImageEnv(max_steps=None)
    mad = _render_mad(env, states, frames)
    print(f"render MAD over {len(idx)} frames: mean {mad.mean():.3f}, median {np.median(mad):.3f}, "
          f"p90 {np.percentile(mad, 90):.3f}, max {mad.max():.3f} (of 255)")
    assert mad.mean() < RENDER_MAD_MEAN_MAX and np.percentile(mad, 90) < RENDER_MAD_P90_MAX
    # Sensitivity: a 3 px block offset must be caught by the same thresholds.
    shifted = _render_mad(env, states[:16] + np.array([0, 0, 3.0, 0, 0]), frames[:16])
    assert shifted.mean() > 2 * RENDER_MAD_MEAN_MAX
    env.close()
