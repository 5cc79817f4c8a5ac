"""Training compute counted in generator sample-passes, a step-based schedule, and neighbour positives (issue 12)."""
import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from drift_policy import train as train_mod
from drift_policy.checkpoint import load_checkpoint
from drift_policy.config import Config, compose
from drift_policy.data.windows import NeighborPositives, make_windows
from drift_policy.errors import ConfigError
from drift_policy.normalizer import Normalizer
from drift_policy.policies import make_policy, policy_class
from drift_policy.records import run_record
from drift_policy.runs import list_checkpoints

TINY = ["policy.backbone=tiny", "train.batch_size=4", "train.eval_episodes=0", "train.threads=1",
        "train.log_every=1", "train.warmup_steps=3", "train.wandb=disabled"]


# ---- sample-pass accounting -------------------------------------------------------------------------------------
def test_budget_turns_into_each_policys_steps():
    drift = compose(["policy=drift_unet", "train.sample_passes=1200000"])
    diffusion = compose(["policy=diffusion_unet", "train.sample_passes=1200000"])
    # Defaults: drift 32 observations x 2 draws, diffusion 64 observations: 64 sample-passes per step each.
    assert drift.sample_passes_per_step == 32 * 2 == diffusion.sample_passes_per_step == 64
    assert drift.train.max_steps == diffusion.train.max_steps == 1_200_000 // 64 == 18750
    # The budget actually spent is recorded: never under the one asked for, less than one step over it.
    odd = compose(["policy=drift_unet", "train.sample_passes=1000", "policy.n_noise=3", "train.batch_size=7"])
    assert odd.train.max_steps == math.ceil(1000 / 21) == 48 and 1000 <= odd.train.sample_passes == 48 * 21 < 1000 + 21
    g8 = compose(["train.sample_passes=1200000", "policy.n_noise=8", "train.batch_size=8"])
    assert g8.train.max_steps == drift.train.max_steps                  # B*G held fixed: the same steps
    # Evaluations at fractions of the budget: every 10 % by default, rounded up so that the 10th is the final one
    # (round(234.4) = 234 put a 10th evaluation at step 2340, 4 steps before the final one: 11 in all).
    assert odd.train.eval_every_steps == 5                               # ceil(4.8)
    assert drift.train.eval_every_steps == diffusion.train.eval_every_steps == 1875


def test_default_batch_keeps_64_chunks_per_step_and_an_explicit_batch_wins():
    for g, b in ((2, 32), (4, 16), (8, 8), (16, 4)):
        cfg = compose([f"policy.n_noise={g}"])
        assert (cfg.train.batch_size, cfg.sample_passes_per_step) == (b, 64)
    assert compose(["policy.n_noise=4", "train.batch_size=32"]).train.batch_size == 32
    assert compose(["policy=diffusion_unet"]).train.batch_size == 64
    with pytest.raises(ConfigError, match="train.batch_size"):
        compose(["train.batch_size=-1"])


@pytest.mark.parametrize("overrides,expect", [
    (["task=pusht_keypoints"], 8),                               # the policy's low-dim rule
    (["task=pusht_image"], 0),                                   # the index would see only agent_pos
    (["task=pusht_image", "policy.neighbor_positives=4"], 4),
    (["task=can_lowdim"], 0),                                    # robomimic's recipe: no neighbours
    (["task=can_lowdim", "recipe=null"], 8),                     # without it, the policy's low-dim rule
    (["task=can_lowdim", "policy.neighbor_positives=8"], 8),     # an explicit count stays
    (["policy.neighbor_positives=0"], 0),
])
def test_neighbour_positives_from_the_policy_rule_or_the_recipe(overrides, expect):
    cfg = compose(["policy=drift_unet", *overrides])
    assert cfg.policy.neighbor_positives == expect
    assert Config.from_dict(cfg.to_dict()).policy.neighbor_positives == expect   # config.json keeps the count


KEYS = ("per_dim_scale", "neighbor_same_episode", "noise_scale")


@pytest.mark.parametrize("overrides,expect", [
    ([], (True, False, 0.5)),                                    # Push-T keypoints' drift recipe
    (["recipe=null"], (False, True, 1.0)),                       # the policy's defaults
    (["task=pusht_image"], (True, True, 0.5)),                    # the pixels recipe: no neighbours to choose from
    (["task=can_lowdim"], (False, True, 1.0)),                   # robomimic: the gripper would lose its weight
    (["task=can_lowdim", "policy.per_dim_scale=true", "policy.noise_scale=0.7"], (True, True, 0.7)),  # explicit stays
    (["policy.per_dim_scale=false", "policy.neighbor_same_episode=true", "policy.noise_scale=1"], (False, True, 1.0)),
])
def test_the_recipe_sets_the_tasks_drift_keys_and_the_command_line_wins(overrides, expect):
    cfg = compose(["policy=drift_unet", *overrides])
    assert tuple(getattr(cfg.policy, k) for k in KEYS) == expect
    again = Config.from_dict(cfg.to_dict()).policy                                  # config.json keeps the values
    assert tuple(getattr(again, k) for k in KEYS) == expect


@pytest.mark.parametrize("overrides,expect", [
    ([], (6e-4, 500)),                                            # Push-T keypoints' drift recipe
    (["recipe=null"], (3e-4, 100)),                               # the trainer's defaults
    (["policy=diffusion_unet"], (3e-4, 100)),                     # the baseline keeps them (no recipe)
    (["task=pusht_image"], (6e-4, 500)),                          # the pixels recipe carries them over
    (["task=pusht_image", "policy=diffusion_unet"], (3e-4, 100)),  # the baseline's pixels keep the defaults
    (["task=can_lowdim"], (3e-4, 100)),                           # not measured on robomimic
    (["train.lr=1e-3"], (1e-3, 500)),                             # an explicit key wins; the other is the recipe's
    (["train.lr=3e-4", "train.warmup_steps=0"], (3e-4, 0)),
])
def test_the_recipe_sets_the_train_keys_for_the_policy_and_the_command_line_wins(overrides, expect):
    cfg = compose(["policy=drift_unet", *overrides])
    assert (cfg.train.lr, cfg.train.warmup_steps) == pytest.approx(expect)
    again = Config.from_dict(cfg.to_dict()).train                                  # config.json keeps the values
    assert (again.lr, again.warmup_steps) == pytest.approx(expect)


def test_a_train_config_built_without_a_recipe_takes_the_trainers_defaults():
    from drift_policy.config import TrainConfig

    t = TrainConfig()
    assert (t.lr, t.warmup_steps) == (3e-4, 100)
    with pytest.raises(ConfigError, match="train.lr must be > 0"):
        TrainConfig(lr=0.0)


def test_a_config_written_before_the_recipe_keys_existed_keeps_what_it_trained_with():
    d = compose(["policy=drift_unet"]).to_dict()
    for k in KEYS:
        del d["policy"][k]
    p = Config.from_dict(d).policy
    assert (p.per_dim_scale, p.neighbor_same_episode, p.noise_scale) == (False, True, 1.0)


def test_a_bad_neighbour_count_is_a_config_error():
    with pytest.raises(ConfigError, match="policy.neighbor_positives"):
        compose(["policy.neighbor_positives=-2"])


def test_explicit_max_steps_wins_and_the_budget_follows():
    cfg = compose(["train.max_steps=10", "train.batch_size=4", "policy.n_noise=2"])
    assert cfg.train.max_steps == 10 and cfg.train.sample_passes == 10 * 4 * 2


def test_resolved_config_resolves_to_itself():
    cfg = compose(["train.sample_passes=100000", "policy.n_noise=4"])
    again = Config.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.to_dict() == cfg.to_dict()


def test_a_budget_of_nothing_is_a_config_error():
    with pytest.raises(ConfigError, match="train.sample_passes or train.max_steps must be > 0"):
        compose(["train.sample_passes=0", "train.max_steps=0"])
    with pytest.raises(ConfigError, match="train.eval_fraction"):
        compose(["train.eval_fraction=2"])


def test_metrics_and_evaluations_count_sample_passes(tmp_path, pusht_zarr):
    cfg = compose([*TINY, f"task.data_root={pusht_zarr.parents[1]}", "policy.n_noise=3", "train.max_steps=4",
                   "train.eval_episodes=1", "train.eval_workers=0", "task.max_steps=8", "train.eval_every_steps=2",
                   f"train.run_dir={tmp_path / 'run'}"])
    run = train_mod.train(cfg, progress=False)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["sample_passes"] for r in lines if "loss" in r] == [s * 4 * 3 for s in (1, 2, 3, 4)]
    ev = json.loads((run / "eval" / "step_00000004.json").read_text())
    assert ev["sample_passes"] == 4 * 12
    rec = run_record(run)                       # what bench train records for this run
    assert rec["steps"] == 4 and rec["sample_passes"] == 48 and rec["complete"]
    assert [e["sample_passes"] for e in rec["evals"]] == [24, 48]
    assert rec["policy"] == "drift" and rec["seed"] == 0 and rec["nfe"] == 1
    # The EMA policy's signals on held-out windows go into the eval file, the metrics log and the record.
    assert set(ev["val"]) >= {"mse_to_expert", "sample_std"} and ev["val"]["mse_to_expert"] > 0
    assert [r["val/mse_to_expert"] for r in lines if "eval/mean_score" in r] == [e["val"]["mse_to_expert"] for e in rec["evals"]]
    # Each evaluation carries the training signals of the log lines since the previous one (steps 1-2, then 3-4).
    logged = {r["step"]: r for r in lines if "loss" in r}
    for e, steps in zip(rec["evals"], ((1, 2), (3, 4))):
        for k in ("loss", "train/mse_to_expert", "train/sample_std"):
            assert e["train"][k] == pytest.approx(sum(logged[s][k] for s in steps) / 2)


# ---- the schedule is a function of the step alone ---------------------------------------------------------------
def test_lr_schedule_is_warmup_then_cosine_over_steps():
    cfg = compose(["train.max_steps=100", "train.warmup_steps=10", "train.lr=1e-3"])
    lrs = [train_mod.lr_at(cfg, s) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))              # non-increasing after warm-up
    assert lrs[55] == pytest.approx(5e-4) and lrs[100] == pytest.approx(0.0, abs=1e-12)
    guarded = compose(["train.max_steps=100", "train.warmup_steps=10", "train.lr=1e-3", "train.max_minutes=0.001"])
    assert [train_mod.lr_at(guarded, s) for s in range(101)] == lrs   # a time guard never bends the schedule


@pytest.mark.parametrize("warmup, reaches", [(10, 8990), (2, 998), (1, 0)])
def test_ema_warmup_reaches_the_decay_where_its_docstring_says(warmup, reaches):
    from drift_policy.ema import ema_update

    def decay_at(step):                       # read back from one update of a 1-parameter model: 0 -> 1
        ema, model = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
        ema.weight.data.zero_(), model.weight.data.fill_(1.0)
        ema_update(ema, model, step, 0.999, warmup)
        return 1 - ema.weight.item()

    assert decay_at(reaches) == pytest.approx(0.999, abs=1e-6)
    if reaches:
        assert decay_at(reaches - 1) < 0.999 - 1e-7
        assert decay_at(0) == pytest.approx(1 / warmup)
    with pytest.raises(ConfigError, match="train.ema_warmup"):
        compose(["train.ema_warmup=0"])


def test_time_guard_stops_without_changing_the_schedule(tmp_path, pusht_zarr, monkeypatch):
    clock = iter(range(0, 10**6, 30))                  # every perf_counter() call: 30 s later
    monkeypatch.setattr(train_mod.time, "perf_counter", lambda: float(next(clock)))
    cfg = compose([*TINY, f"task.data_root={pusht_zarr.parents[1]}", "train.max_steps=50", "train.max_minutes=1",
                   f"train.run_dir={tmp_path / 'run'}"])
    with pytest.warns(UserWarning, match="did not finish"):
        run = train_mod.train(cfg, progress=False)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert 0 < len(lines) < 50
    for r in lines:   # the logged LR (set before the step) is the step schedule's
        assert r["lr"] == pytest.approx(train_mod.lr_at(cfg, r["step"] - 1))


def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, pusht_zarr):
    common = [*TINY, f"task.data_root={pusht_zarr.parents[1]}", "train.max_steps=8", "train.ckpt_every_steps=4",
              "train.keep_checkpoints=3"]
    full = train_mod.train(compose([*common, f"train.run_dir={tmp_path / 'full'}"]), progress=False)
    cut = train_mod.train(compose([*common, f"train.run_dir={tmp_path / 'cut'}"]), progress=False)
    # Interrupt "cut" after step 4: drop everything it did later, then resume.
    for p in list_checkpoints(cut):
        if p.stem.endswith("00000008"):
            p.unlink()
            p.with_name(p.name + ".json").unlink(missing_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_mod.train(compose([*common, f"train.run_dir={cut}"]), run_dir=cut, resume=True, progress=False)
    a = load_checkpoint(full / "checkpoints" / "step_00000008.pt")
    b = load_checkpoint(cut / "checkpoints" / "step_00000008.pt")
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], v) for k, v in b[key].items())


# ---- neighbour positives ------------------------------------------------------------------------------------------
def _toy_data(n_eps=6, length=20, dim=3):
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(n_eps * length, dim)).astype(np.float32)
    action = (np.arange(n_eps * length, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32))  # action = step id
    return {"obs": obs, "action": action, "episode_ends": np.arange(1, n_eps + 1) * length}


def test_neighbour_positives_shapes_weights_and_own_chunk_first():
    train, _ = make_windows(_toy_data(), horizon=4, n_obs_steps=2, n_action_steps=2, val_ratio=0.0)
    norm = Normalizer().fit("obs", train.steps("obs"))
    train.neighbors = NeighborPositives(train, lambda o: norm.normalize("obs", o), k=5, bandwidth=0.3)
    batch = train.sample(7, torch.Generator().manual_seed(0))
    assert batch["pos_action"].shape == (7, 6, 4, 2) and batch["pos_weight"].shape == (7, 6)
    assert torch.equal(batch["pos_action"][:, 0], batch["action"])          # the sample's own chunk, first
    w = batch["pos_weight"]
    assert torch.all(w[:, 0] == 1) and torch.all((w > 0) & (w <= 1))
    assert torch.all(w[:, :-1] >= w[:, 1:])                                  # nearer observations weigh more
    # The weights are the Gaussian kernel of the RMS normalised-observation distance.
    ids, weights = train.neighbors.lookup(torch.tensor([3]))
    keys = train.neighbors.keys
    d = (keys[ids[0]] - keys[3]).pow(2).mean(1).sqrt()
    assert torch.allclose(weights[0], torch.exp(-0.5 * (d / 0.3) ** 2), atol=1e-5)
    # Brute force: they are the k nearest.
    all_d = (keys - keys[3]).pow(2).mean(1).sqrt()
    assert torch.allclose(d.sort().values, all_d.sort().values[:6], atol=1e-6)


def test_neighbour_search_by_one_matrix_product_finds_the_exact_nearest_with_exact_weights():
    """The search ranks by |k|^2 - 2 q.k (one matrix product) and then measures the chosen ones exactly: on many
    windows of a wide observation, every query gets the brute-force k nearest (ascending, itself first) and the
    kernel weights of their exact distances."""
    train, _ = make_windows(_toy_data(n_eps=40, length=60, dim=30), horizon=4, n_obs_steps=2, n_action_steps=2,
                            val_ratio=0.0)
    norm = Normalizer().fit("obs", train.steps("obs"))
    for same in (True, False):
        nbp = NeighborPositives(train, lambda o: norm.normalize("obs", o), k=8, bandwidth=0.5, same_episode=same)
        ids = torch.arange(0, len(train), 7)
        nb, w = nbp.lookup(ids)
        d = torch.cdist(nbp.keys[ids].double(), nbp.keys.double()) / nbp.keys.shape[1] ** 0.5        # [B, W]
        if not same:
            d[train.episode[ids].unsqueeze(1) == train.episode.unsqueeze(0)] = float("inf")
        d[torch.arange(len(ids)), ids] = 0.0
        want = d.sort(dim=1).values[:, :9]
        got = d.gather(1, nb)
        assert torch.equal(nb[:, 0], ids) and torch.all(w[:, 0] == 1)
        assert torch.allclose(got, want, atol=1e-6) and torch.all(got[:, :-1] <= got[:, 1:] + 1e-12)
        assert torch.allclose(w.double(), torch.exp(-0.5 * (got / 0.5) ** 2), atol=1e-5)


def test_neighbours_from_other_episodes_skip_the_own_demonstration():
    data = _toy_data(n_eps=6, length=20)
    # obs = time + 100 * episode: a window's nearest observations are its own episode's, a few steps away.
    data["obs"] = (np.tile(np.arange(20), 6) + 100 * np.repeat(np.arange(6), 20)).astype(np.float32)[:, None]
    train, _ = make_windows(data, horizon=4, n_obs_steps=2, n_action_steps=2, val_ratio=0.0)
    assert torch.equal(train.episode, torch.as_tensor(np.searchsorted(data["episode_ends"], train.index[:, 0].numpy(),
                                                                      side="right")))
    norm = Normalizer().fit("obs", train.steps("obs"))
    ids = torch.arange(len(train))
    own_ep = train.episode[ids].unsqueeze(1)
    both = NeighborPositives(train, lambda o: norm.normalize("obs", o), k=5, bandwidth=0.3)
    nb, _ = both.lookup(ids)
    assert (train.episode[nb] == own_ep).all()                            # the default: time-shifted copies
    other = NeighborPositives(train, lambda o: norm.normalize("obs", o), k=5, bandwidth=0.3, same_episode=False)
    nb, w = other.lookup(ids)
    assert torch.equal(nb[:, 0], ids) and torch.all(w[:, 0] == 1)           # the own chunk stays first
    assert not (train.episode[nb[:, 1:]] == own_ep).any()                   # no other window of its episode
    # Brute force: the k nearest among the other episodes' windows, with the kernel weights of their distances.
    keys = other.keys
    for i in (0, 17, len(train) - 1):
        d = (keys - keys[i]).pow(2).mean(1).sqrt()
        d[train.episode == train.episode[i]] = float("inf")
        got = (keys[nb[i, 1:]] - keys[i]).pow(2).mean(1).sqrt()
        assert torch.allclose(got, d.sort().values[:5], atol=1e-6)
        assert torch.allclose(w[i, 1:], torch.exp(-0.5 * (got / 0.3) ** 2), atol=1e-5)
    with pytest.raises(ValueError, match="other episodes"):
        NeighborPositives(train, lambda o: norm.normalize("obs", o), k=len(train) - 10, bandwidth=0.3, same_episode=False)


def test_neighbours_by_a_side_array_that_the_policy_never_sees():
    """``key="state"``: the distance is measured on the side array (the state behind a camera frame), which never
    reaches a batch; the observation plays no part."""
    data = _toy_data(n_eps=6, length=20)
    data["state"] = (np.tile(np.arange(20), 6) * 1.0 + 0.01 * np.repeat(np.arange(6), 20)).astype(np.float32)[:, None]
    train, _ = make_windows(data, horizon=4, n_obs_steps=2, n_action_steps=2, val_ratio=0.0)
    assert "state" not in train.keys and "state" not in train.sample(3, torch.Generator().manual_seed(0))
    norm = Normalizer().fit("state", train.steps("state"))
    nb_state = NeighborPositives(train, lambda o: norm.normalize("state", o), k=5, bandwidth=0.3, same_episode=False,
                                 key="state")
    ids = torch.arange(len(train))
    nb, _ = nb_state.lookup(ids)
    # state = the step within the episode: every neighbour is the same step of another demonstration
    step = data["state"][train.index[:, 1].numpy(), 0].round()
    assert np.array_equal(step[nb.numpy()], np.repeat(step[:, None], 6, axis=1))
    obs_norm = Normalizer().fit("obs", train.steps("obs"))
    by_obs, _ = NeighborPositives(train, lambda o: obs_norm.normalize("obs", o), k=5, bandwidth=0.3,
                                  same_episode=False).lookup(ids)
    assert not torch.equal(by_obs, nb)


def test_pixels_find_the_neighbours_the_keypoints_policy_finds(pusht_zarr):
    """policy.neighbor_key=state on Push-T from pixels: the windows' neighbours are those the keypoints policy
    finds from its observation (the same steps, normalised alike); a task without the array is a one-line error."""
    root = f"task.data_root={pusht_zarr.parents[1]}"
    pix = compose(["task=pusht_image", "policy.neighbor_positives=4", "policy.neighbor_key=state",
                   "policy.neighbor_same_episode=false", root])
    kp = compose(["policy.neighbor_positives=4", "policy.neighbor_same_episode=false", root])
    sets = {}
    for name, cfg in (("pix", pix), ("kp", kp)):
        train, _ = train_mod.make_datasets(cfg)
        norm = Normalizer().fit("obs", train.steps("obs")).fit("action", train.steps("action"))
        policy_class(cfg.policy).prepare_data(cfg.policy, train, norm)
        sets[name] = train.neighbors.lookup(torch.arange(0, len(train), 97))
    assert torch.equal(sets["pix"][0], sets["kp"][0]) and torch.allclose(sets["pix"][1], sets["kp"][1])
    cfg = compose(["policy.neighbor_positives=4", "policy.neighbor_key=state", root])
    train, _ = train_mod.make_datasets(cfg)
    with pytest.raises(ConfigError, match="no 'state' array"):
        policy_class(cfg.policy).prepare_data(cfg.policy, train, norm)
    with pytest.raises(ConfigError, match="policy.neighbor_key must be one of"):
        compose(["policy.neighbor_key=keypoints"])


def test_validation_episodes_never_become_positives():
    data = _toy_data(n_eps=10)
    train, val = make_windows(data, horizon=4, n_obs_steps=2, n_action_steps=2, val_ratio=0.3, seed=1)
    norm = Normalizer().fit("obs", train.steps("obs"))
    train.neighbors = NeighborPositives(train, lambda o: norm.normalize("obs", o), k=8, bandwidth=1.0)
    val_steps = set(torch.unique(val.index).tolist())
    batch = train.sample(64, torch.Generator().manual_seed(0))
    used = set(batch["pos_action"][..., 0].long().flatten().tolist())       # action value = flat step id
    assert used and not used & val_steps


def test_drift_loss_uses_the_neighbour_positives(pusht_zarr):
    from drift_policy.policies import make_policy

    cfg = compose(["policy.backbone=tiny", "policy.neighbor_positives=4", f"task.data_root={pusht_zarr.parents[1]}"])
    train, _ = train_mod.make_datasets(cfg)
    norm = Normalizer().fit("obs", train.steps("obs")).fit("action", train.steps("action"))
    train.neighbors = NeighborPositives(train, lambda o: norm.normalize("obs", o), 4, 0.05)
    torch.manual_seed(0)
    policy = make_policy(cfg.policy, norm)
    batch = train.sample(4, torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    with_nb, _ = policy.compute_loss(batch)
    with_nb.backward()
    assert all(torch.isfinite(p.grad).all() for p in policy.parameters() if p.grad is not None)
    torch.manual_seed(1)
    own_only, _ = policy.compute_loss({k: v for k, v in batch.items() if not k.startswith("pos_")})
    assert not torch.allclose(with_nb, own_only)                      # the extra positives change the field


def test_validation_signals_are_seeded_and_leave_the_training_rng_alone(pusht_zarr):
    cfg = compose([*TINY, f"task.data_root={pusht_zarr.parents[1]}", "train.max_steps=4"])
    train_set, val_set = train_mod.make_datasets(cfg)
    assert val_set is not None and len(val_set) > 0
    norm = Normalizer().fit("obs", train_set.steps("obs")).fit("action", train_set.steps("action"))
    policy = make_policy(cfg.policy, norm).eval()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = train_mod.validation_signals(policy, val_set)
    assert torch.equal(torch.rand(3), expected)               # the training stream continues as if never called
    assert train_mod.validation_signals(policy, val_set) == first and first["mse_to_expert"] > 0
    assert train_mod.validation_signals(policy, None) == {}   # no held-out split (task.val_ratio=0): nothing


def _fake_run(d, seed: int, eval_episodes: int, scores, overrides=()):
    """A finished-looking run folder: its resolved config and one eval file per score (what bench reads)."""
    from drift_policy import runs

    cfg = compose(["train.sample_passes=640", f"train.seed={seed}", f"train.eval_episodes={eval_episodes}",
                   "train.eval_fraction=0.5", *overrides])
    runs.write_config(d, cfg)
    steps = cfg.train.max_steps
    for i, s in enumerate(scores, 1):
        p = runs.eval_path(d, i * steps // len(scores))
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"step": i * steps // len(scores), "train_minutes": float(i), "mean_score": s,
                                 "success_rate": s / 2}))


def test_a_report_only_record_states_how_its_runs_were_evaluated(tmp_path):
    from drift_policy.bench import bench_train

    _fake_run(tmp_path / "runs" / "drift_unet-s0", 0, 7, [0.5, 0.75])
    _fake_run(tmp_path / "runs" / "drift_unet-s1", 1, 7, [0.25, 0.5])
    path = bench_train(["report_only=1", "budget=640", "policies=drift_unet", "episodes=50", "evals=10",
                        f"runs={tmp_path / 'runs'}", f"out={tmp_path / 'out'}"])
    rec = json.loads(path.read_text())
    assert rec["meta"]["eval_episodes"] == 7 and rec["meta"]["eval_fraction"] == 0.5   # the runs', not the command's
    assert "on 7 test seeds" in path.with_suffix(".md").read_text()
    # Neither run has its final weights: the done column says how far they were evaluated (here to the last step,
    # 640 sample-passes at 32 x G 2 per step).
    row = next(line for line in path.with_suffix(".md").read_text().splitlines() if line.startswith("| drift_unet |"))
    assert row.endswith("| no: evaluated to 640 |")
    s = rec["summary"]["drift_unet"]
    assert s["seeds"] == [0, 1] and s["max_score"] == pytest.approx(0.625) and s["last5_score"] == pytest.approx(0.5)
    _fake_run(tmp_path / "runs" / "drift_unet-s1", 1, 20, [0.25, 0.5])
    with pytest.raises(SystemExit, match="different train.eval_episodes"):
        bench_train(["report_only=1", "budget=640", "policies=drift_unet", f"runs={tmp_path / 'runs'}",
                     f"out={tmp_path / 'out'}"])


def _recipes(path) -> dict[str, str]:
    """{variant label: its recipe column} of a record's .md table."""
    rows = [line.split(" | ") for line in path.with_suffix(".md").read_text().splitlines() if line.startswith("| drift")]
    return {r[0][2:]: r[1] for r in rows}


def test_a_records_recipe_column_names_exactly_the_keys_that_differ_from_the_default(tmp_path):
    from drift_policy.bench import bench_train

    _fake_run(tmp_path / "runs" / "drift_unet-s0", 0, 7, [0.5, 0.75])
    keys = ["policy.neighbor_bandwidth=0.03", "train.ema_decay=0.9999", "policy.guidance=2", "policy.n_action_steps=4",
            "policy.neighbor_same_episode=true", "train.weight_decay=0.1"]
    _fake_run(tmp_path / "runs" / "drift_unet_policy.neighbor_bandwidth_0.03_train.ema_decay_0.9999_policy.guidance_2_policy.n_action_steps_4_policy.neighbor_same_episode_true_train.weight_decay_0.1-s0", 0, 7, [0.5, 0.75],  # noqa: E501
              overrides=keys)
    path = bench_train(["report_only=1", "budget=640", "seeds=0", "policies=drift_unet,drift_unet:" + "+".join(keys),
                        f"runs={tmp_path / 'runs'}", f"out={tmp_path / 'out'}"])
    recipes = _recipes(path)
    # The default's runs (whatever the task chose for it: Push-T keypoints' lr, neighbours, noise scale) differ in
    # nothing; the variant in exactly its six keys, policy keys first, each as an override writes it. How the runs
    # were carried out (threads, workers, seed) and the budget are not part of a recipe.
    assert recipes["drift_unet"] == "defaults"
    assert recipes["drift_unet[" + " ".join(keys) + "]"] == ("policy.n_action_steps=4 policy.neighbor_bandwidth=0.03 "
                                                          "policy.neighbor_same_episode=true policy.guidance=2 "
                                                          "train.weight_decay=0.1 train.ema_decay=0.9999")
    rec = json.loads(path.read_text())
    assert set(rec["meta"]["recipe_defaults"]["configs"]) == {"drift_unet"}       # the reference, kept with the record


def test_a_recipe_column_names_a_key_it_was_never_told_about(tmp_path, monkeypatch):
    """A key added to a policy later needs no edit of the namer: the column is a diff of the resolved configs."""
    from drift_policy.records import recipe_diff, resolved_recipe

    _fake_run(tmp_path / "a", 0, 7, [0.5], overrides=["policy.n_action_steps=4", "policy.temperatures=[0.01,0.05]"])
    _fake_run(tmp_path / "b", 0, 7, [0.5])
    from drift_policy.records import run_record

    run, default = run_record(tmp_path / "a"), run_record(tmp_path / "b")
    assert recipe_diff(run, default) == [("policy.n_action_steps", 4), ("policy.temperatures", [0.01, 0.05])]
    assert recipe_diff(default, default) == []
    # A policy key this version has never heard of would make the resolved config unreadable, so the diff can only
    # see keys of the config class; any of them, such as one no namer listed, shows up:
    run["policy_config"]["neighbor_bandwidth"] = 0.07
    assert ("policy.neighbor_bandwidth", 0.07) in recipe_diff(run, default)
    assert set(resolved_recipe(run)) == {"policy", "train"}


def test_a_records_recipe_column_names_a_changed_execution_horizon(tmp_path):
    from drift_policy.bench import bench_train

    _fake_run(tmp_path / "runs" / "drift_unet_policy.n_action_steps_4-s0", 0, 7, [0.5, 0.75],
              overrides=["policy.n_action_steps=4"])
    path = bench_train(["report_only=1", "budget=640", "seeds=0", "policies=drift_unet:policy.n_action_steps=4",
                        f"runs={tmp_path / 'runs'}", f"out={tmp_path / 'out'}"])
    assert _recipes(path) == {"drift_unet[policy.n_action_steps=4]": "policy.n_action_steps=4"}


def test_a_records_recipe_column_names_the_bandwidth_and_gradient_clip(tmp_path):
    from drift_policy.bench import bench_train

    _fake_run(tmp_path / "runs" / "drift_unet-s0", 0, 7, [0.5, 0.75])
    _fake_run(tmp_path / "runs" / "drift_unet_policy.neighbor_bandwidth_0.03_train.grad_clip_0-s0",
              0, 7, [0.5, 0.75], overrides=["policy.neighbor_bandwidth=0.03", "train.grad_clip=0"])
    path = bench_train(["report_only=1", "budget=640", "seeds=0",
                        "policies=drift_unet,drift_unet:policy.neighbor_bandwidth=0.03+train.grad_clip=0",
                        f"runs={tmp_path / 'runs'}", f"out={tmp_path / 'out'}"])
    assert list(_recipes(path).values()) == [
        "defaults", "policy.neighbor_bandwidth=0.03 train.grad_clip=0"]


def test_a_list_override_is_one_variant_in_policies(tmp_path):
    from drift_policy.bench import bench_train

    _fake_run(tmp_path / "runs" / "drift_unet_policy.temperatures__0.01_0.05-s0", 0, 7, [0.5, 0.75],
              overrides=["policy.temperatures=[0.01,0.05]"])
    path = bench_train(["report_only=1", "budget=640", "seeds=0", "policies=drift_unet:policy.temperatures=[0.01,0.05]",
                        f"runs={tmp_path / 'runs'}", f"out={tmp_path / 'out'}"])
    runs = json.loads(path.read_text())["runs"]
    assert len(runs) == 1 and runs[0]["policy_config"]["temperatures"] == [0.01, 0.05]
    assert list(_recipes(path).values()) == ["policy.temperatures=[0.01,0.05]"]      # the recipe column names them
    with pytest.raises(ConfigError, match="unbalanced"):
        bench_train(["report_only=1", "budget=640", "seeds=0", "policies=drift_unet:policy.temperatures=[0.01,0.05",
                     f"runs={tmp_path / 'runs'}", f"out={tmp_path / 'out'}"])


def test_a_record_names_the_test_seeds_that_failed_outright(tmp_path):
    from drift_policy import runs
    from drift_policy.bench import bench_train
    from drift_policy.records import LOW_SCORE

    d = tmp_path / "runs" / "drift_unet-s0"
    _fake_run(d, 0, 4, [0.5, 0.75])
    rewards = {100000: 0.99, 100001: LOW_SCORE - 0.01, 100002: LOW_SCORE, 100003: 0.0}   # 100001, 100003 fail
    for f in runs.eval_files(d):
        r = json.loads(f.read_text())
        r["per_episode"] = [{"seed": s, "max_reward": v, "steps": 10, "success": v > 0.95} for s, v in rewards.items()]
        f.write_text(json.dumps(r))
    path = bench_train(["report_only=1", "budget=640", "seeds=0", "policies=drift_unet",
                        f"runs={tmp_path / 'runs'}", f"out={tmp_path / 'out'}"])
    rec = json.loads(path.read_text())["runs"][0]
    assert [e["low_score_seeds"] for e in rec["evals"]] == [[100001, 100003]] * 2
    assert "- drift_unet seed 0: 4 of 8 episodes; 100001 (2), 100003 (2)" in path.with_suffix(".md").read_text()


def _record(tmp_path, name: str, runs_spec: list) -> str:
    """A ``bench train`` record at tmp_path/<name>/pusht_keypoints.json of fake runs [(label folder, seed, episodes,
    scores, overrides)]; the policies option names each variant."""
    from drift_policy.bench import bench_train

    root = tmp_path / f"runs_{name}"
    for folder, seed, episodes, scores, overrides in runs_spec:
        _fake_run(root / f"{folder}-s{seed}", seed, episodes, scores, overrides)
    variants = {}
    for folder, seed, _, _, overrides in runs_spec:
        variants.setdefault("drift_unet" + (":" + "+".join(overrides) if overrides else ""), []).append(seed)
    seeds = sorted({s for v in variants.values() for s in v})
    path = bench_train(["report_only=1", "budget=640", f"seeds={','.join(map(str, seeds))}",
                        "policies=" + ",".join(variants), f"runs={root}", f"out={tmp_path / name}"])
    return str(path)


def test_merge_joins_the_seeds_of_one_recipe_from_several_records(tmp_path):
    from drift_policy.bench import bench_merge

    # Seed 1 of the lr-1e-3 variant ran with torch.compile and other checkpoint settings (how it ran, not what it
    # trained), so its record labels it otherwise.
    a = _record(tmp_path, "a", [("drift_unet_train.lr_1e-3", 0, 7, [0.5, 0.75], ["train.lr=1e-3"]),
                                ("drift_unet", 0, 7, [0.25, 0.25], [])])
    b = _record(tmp_path, "b", [("drift_unet_train.lr_1e-3_train.compile_true_train.keep_checkpoints_5", 1, 7,
                                 [0.25, 0.5], ["train.lr=1e-3", "train.compile=true", "train.keep_checkpoints=5"])])
    # b was written while two policy keys existed that are gone (at the value the code now always uses) and before
    # a train key existed: read as what it was trained with (REMOVED, LEGACY).
    old = json.loads(Path(b).read_text())
    old["runs"][0]["policy_config"].update(kernel_scale="batch", neighbor_negatives=0)
    del old["runs"][0]["train_config"]["ema_warmup"]
    Path(b).write_text(json.dumps(old))
    path = bench_merge([f"records={a}=drift_unet[train.lr=1e-3],{b}", f"out={tmp_path / 'm'}"])
    rec = json.loads(path.read_text())
    assert list(rec["summary"]) == ["drift_unet[train.lr=1e-3]"]            # the unchosen default-lr runs are left out
    s = rec["summary"]["drift_unet[train.lr=1e-3]"]
    assert s["seeds"] == [0, 1] and s["max_score"] == pytest.approx(0.625) and s["last5_score"] == pytest.approx(0.5)
    assert s["last5_score_sd"] == pytest.approx(math.sqrt(2) * 0.125)          # last-5 0.625 and 0.375
    assert "| 0.500 ± 0.177 |" in path.with_suffix(".md").read_text()
    assert [r["source_label"] for r in rec["runs"]] == [
        "drift_unet[train.lr=1e-3]", "drift_unet[train.lr=1e-3 train.compile=true train.keep_checkpoints=5]"]
    from drift_policy.provenance import machine_free

    assert rec["runs"][1]["source_record"] == machine_free(b) == rec["meta"]["sources"][1]["record"]
    assert machine_free(b).endswith("b/pusht_keypoints.json") and str(tmp_path) not in path.read_text()
    assert "Merged by `bench merge`" in path.with_suffix(".md").read_text()
    # Without a choice every run comes, and a different recipe (the default's lr) is its own variant; the same run read
    # twice (record a given twice) is kept once.
    rec = json.loads(bench_merge([f"records={a},{a}", f"out={tmp_path / 'm2'}"]).read_text())
    assert sorted(rec["summary"]) == ["drift_unet", "drift_unet[train.lr=1e-3]"]
    assert len(rec["runs"]) == 2


def test_merge_refuses_runs_that_do_not_compare(tmp_path):
    from drift_policy.bench import bench_merge

    a = _record(tmp_path, "a", [("drift_unet", 0, 7, [0.5, 0.75], [])])
    other_run = _record(tmp_path, "b", [("drift_unet", 0, 7, [0.5, 0.5], [])])        # same recipe and seed
    other_seeds = _record(tmp_path, "c", [("drift_unet", 1, 9, [0.5, 0.5], [])])      # 9 test episodes, not 7
    with pytest.raises(SystemExit, match="two different runs of one recipe with seed 0"):
        bench_merge([f"records={a},{other_run}", f"out={tmp_path / 'm'}"])
    with pytest.raises(SystemExit, match="different train.eval_episodes"):
        bench_merge([f"records={a},{other_seeds}", f"out={tmp_path / 'm'}"])
    with pytest.raises(SystemExit, match="no run labelled \\['diffusion_unet'\\]"):
        bench_merge([f"records={a}=diffusion_unet", f"out={tmp_path / 'm'}"])
    with pytest.raises(SystemExit, match="no record at"):
        bench_merge([f"records={tmp_path / 'none.json'}", f"out={tmp_path / 'm'}"])
    with pytest.raises(ConfigError, match="records and out are required"):
        bench_merge([f"records={a}"])
    assert not (tmp_path / "m").exists()                      # nothing written by a refused merge


def test_the_config_switch_reaches_the_neighbour_index(pusht_zarr):
    cfg = compose(["policy.neighbor_positives=4", "policy.neighbor_same_episode=false", f"task.data_root={pusht_zarr.parents[1]}"])
    train, _ = train_mod.make_datasets(cfg)
    norm = Normalizer().fit("obs", train.steps("obs")).fit("action", train.steps("action"))
    policy_class(cfg.policy).prepare_data(cfg.policy, train, norm)      # what train.py does
    ids = torch.arange(0, len(train), 7)
    nb, _ = train.neighbors.lookup(ids)
    assert nb.shape[1] == 1 + 4
    assert not (train.episode[nb[:, 1:]] == train.episode[ids].unsqueeze(1)).any()
    # a policy that reads nothing more (the diffusion baseline; drift without neighbours) leaves the windows alone
    for other in (compose(["policy=diffusion_unet"]).policy, compose(["policy.neighbor_positives=0"]).policy):
        train.neighbors = None
        policy_class(other).prepare_data(other, train, norm)
        assert train.neighbors is None and "pos_action" not in train.sample(2, torch.Generator().manual_seed(0))


# ---- scoring a trained run again with inference-only keys changed ---------------------------------------------------
def test_rescore_replays_every_evaluation_from_its_checkpoint(tmp_path, pusht_zarr):
    from drift_policy.bench import bench_rescore, bench_train

    cfg = compose([*TINY, f"task.data_root={pusht_zarr.parents[1]}", "train.max_steps=4", "train.eval_every_steps=2",
                   "train.ckpt_every_steps=2", "train.keep_checkpoints=5", "train.eval_episodes=2",
                   "train.eval_workers=0", "task.max_steps=16", "policy.noise_scale=1",
                   f"train.run_dir={tmp_path / 'drift_unet-s0'}"])
    src = train_mod.train(cfg, progress=False)
    common = [f"runs={tmp_path}", "policies=drift_unet", "seeds=0"]
    # An unchanged policy reproduces its source's evaluations exactly: the same weights, test seeds and noise.
    (same,) = bench_rescore([*common, "set=policy.noise_scale=1"])
    assert same.name == "drift_unet_policy.noise_scale_1-s0"
    for step in (2, 4):
        a = json.loads((src / "eval" / f"step_{step:08d}.json").read_text())
        b = json.loads((same / "eval" / f"step_{step:08d}.json").read_text())
        assert [e["max_reward"] for e in b["per_episode"]] == [e["max_reward"] for e in a["per_episode"]]
        assert b["mean_score"] == a["mean_score"] and b["train_minutes"] == a["train_minutes"]
        assert b["val"] == a["val"] and b["rescored_from"].endswith(f"step_{step:08d}.json")
    # A changed key: the new run holds it in config.json and in its pretrained policy, and records like any run.
    (zero,) = bench_rescore([*common, "set=policy.noise_scale=0"])
    assert json.loads((zero / "config.json").read_text())["policy"]["noise_scale"] == 0
    assert json.loads((zero / "pretrained" / "config.json").read_text())["noise_scale"] == 0
    rec = run_record(zero)
    assert [e["steps"] for e in rec["evals"]] == [2, 4] and rec["complete"] and rec["sample_passes"] == 4 * 4 * 2
    assert (zero / "metrics.jsonl").read_text() == (src / "metrics.jsonl").read_text()
    # Cut short after its first evaluation, a rescored run counts only what it scored, not its source's training.
    (half,) = bench_rescore([*common, "set=policy.noise_scale=0.25"])
    (half / "eval" / "step_00000004.json").unlink()
    shutil.rmtree(half / "pretrained")
    rec = run_record(half)
    assert rec["steps"] == 2 and rec["sample_passes"] == 2 * 4 * 2 and not rec["complete"]
    # More test seeds, at the last evaluation only: the last-k statistics on a larger test set.
    (wide,) = bench_rescore([*common, "episodes=3", "last=1"])
    assert wide.name == "drift_unet_train.eval_episodes_3-s0"
    assert [p.name for p in (wide / "eval").glob("step_*.json")] == ["step_00000004.json"]
    ev = json.loads((wide / "eval" / "step_00000004.json").read_text())
    assert [e["seed"] for e in ev["per_episode"]] == [100000, 100001, 100002]
    assert json.loads((wide / "config.json").read_text())["train"]["eval_episodes"] == 3
    rec = run_record(wide)
    assert [e["steps"] for e in rec["evals"]] == [4] and rec["complete"] and rec["rescored"]["last"] == 1
    md = bench_train(["report_only=1", "budget=32", "seeds=0", "policies=drift_unet:train.eval_episodes=3",
                      f"runs={tmp_path}", f"out={tmp_path / 'wide_record'}"]).with_suffix(".md").read_text()
    assert "on 3 test seeds" in md and "drift_unet[train.eval_episodes=3] (last 1)" in md
    with pytest.raises(ConfigError, match="episodes=N"):
        bench_rescore(common)
    # The run's own sampling seed (its training seed, 0) reproduces it; another draws other noise, into its own run.
    (own,) = bench_rescore([*common, "sampling_seed=0", "last=1"])
    assert own.name == "drift_unet_sampling_seed_0-s0" and run_record(own)["rescored"]["sampling_seed"] == 0
    ev = json.loads((own / "eval" / "step_00000004.json").read_text())
    assert ev["per_episode"] == json.loads((src / "eval" / "step_00000004.json").read_text())["per_episode"]
    (other,) = bench_rescore([*common, "sampling_seed=7", "last=1"])
    assert run_record(other)["rescored"]["sampling_seed"] == 7
    from drift_policy.records import recipe_key
    assert recipe_key(run_record(other)) != recipe_key(run_record(own)) == recipe_key(run_record(src))
    md = bench_train(["report_only=1", "budget=32", "seeds=0", "policies=drift_unet:sampling_seed=7", f"runs={tmp_path}",
                      f"out={tmp_path / 'sampling_record'}"]).with_suffix(".md").read_text()
    row = next(x.split(" | ") for x in md.splitlines() if x.startswith("| drift_unet[sampling_seed=7] |"))
    assert row[1].endswith(" sampling_seed=7") and "policy.backbone=tiny" in row[1]     # TINY's keys, then the seed
    with pytest.raises(ConfigError, match="sampling_seed must be >= 0"):
        bench_rescore([*common, "sampling_seed=-2"])
    # Rerunning continues (nothing left to do); a key that changes training is refused, naming it.
    assert bench_rescore([*common, "set=policy.noise_scale=0"]) == [zero]
    with pytest.raises(ConfigError, match="policy.n_noise"):
        bench_rescore([*common, "set=policy.n_noise=3"])
    # Without the checkpoint of every evaluation there is nothing to replay: the missing steps are named.
    (src / "checkpoints" / "step_00000002.pt").unlink()
    with pytest.raises(SystemExit, match=r"steps \[2\]"):
        bench_rescore([*common, "set=policy.noise_scale=0.5"])
