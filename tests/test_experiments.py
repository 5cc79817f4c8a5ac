"""The repository's configs/: one config per recorded result, each composed with one command
(``drift-policy train --config-dir configs --config-name NAME``), and each the recipe its record was trained with."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from drift_policy.config import compose

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
NAMES = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
BENCH = ["train.compile=true", "train.ckpt_every_steps=1875", "train.keep_checkpoints=10"]


def _experiment(name: str, overrides=()):
    return compose(list(overrides), config_dir=CONFIGS, config_name=name)


def test_the_results_each_have_an_experiment_that_says_how_to_run_it():
    assert {"pusht_keypoints_drift", "pusht_keypoints_diffusion", "pusht_image_drift", "can_lowdim_drift",
            "blockpush_lowdim_drift"} <= set(NAMES)
    for name in NAMES:
        text = (CONFIGS / f"{name}.yaml").read_text()
        assert f"drift-policy train --config-dir configs --config-name {name}" in text, name
        assert "eval/results/" in text, name                            # the record it reproduces
        cfg = _experiment(name)
        assert name.startswith(f"{cfg.task.name}_{cfg.policy.type}"), name
    assert all(name in (CONFIGS / "README.md").read_text() for name in NAMES)


def test_the_push_t_default_experiment_is_the_package_default_with_the_bench_keys():
    assert _experiment("pusht_keypoints_drift").to_dict() == compose(BENCH).to_dict()
    assert _experiment("pusht_keypoints_diffusion").to_dict() == compose(["policy=diffusion_unet", *BENCH]).to_dict()
    # the command line still overrides an experiment, its recipe included
    cfg = _experiment("pusht_keypoints_drift", ["train.seed=2", "policy.noise_scale=1", "train.lr=3e-4"])
    assert (cfg.train.seed, cfg.policy.noise_scale, cfg.train.lr, cfg.train.compile) == (2, 1.0, 3e-4, True)


@pytest.mark.parametrize("name,record,label", [
    ("pusht_keypoints_drift", "pusht_keypoints/default/official/pusht_keypoints.json", "drift_unet"),
    ("pusht_keypoints_diffusion", "pusht_keypoints/default/official/pusht_keypoints.json", "diffusion_unet"),
    ("can_lowdim_drift", "can_lowdim/default/can_neighbours/can_lowdim.json", "drift_unet[policy.neighbor_positives=0]"),
    ("can_lowdim_diffusion", "can_lowdim/default/can1200k/can_lowdim.json", "diffusion_unet"),
    ("kitchen_lowdim_drift", "kitchen_lowdim/default/kitchen600k/kitchen_lowdim.json", "drift_unet"),
    ("kitchen_lowdim_diffusion", "kitchen_lowdim/default/kitchen600k/kitchen_lowdim.json", "diffusion_unet"),
    ("pusht_image_drift", "pusht_image/default/bench600k/pusht_image.json", "drift_unet"),
    ("pusht_image_diffusion", "pusht_image/default/bench600k/pusht_image.json", "diffusion_unet"),
])
def test_an_experiment_trains_the_recipe_of_its_record(name, record, label):
    """The same resolved policy and training config as the record's runs, but for how they ran (threads,
    checkpoints, torch.compile) and the seed: what ``bench merge`` counts as one recipe."""
    from drift_policy.bench import recipe_key

    cfg = _experiment(name).to_dict()
    ours = recipe_key({"policy_config": cfg["policy"], "train_config": cfg["train"]})
    runs = [r for r in json.loads((REPO / "eval" / "results" / record).read_text())["runs"] if r["label"] == label]
    assert runs and all(recipe_key(r) == ours for r in runs), name


@pytest.mark.parametrize("name,record", [
    ("blockpush_lowdim_drift", "blockpush_lowdim/default/blockpush_drift_g8.json"),
    ("blockpush_lowdim_diffusion", "blockpush_lowdim/default/blockpush_diffusion.json"),
])
def test_an_experiment_of_an_older_record_keeps_its_policy_and_batch(name, record):
    """Records written before the sample-pass budget (``bench summary``): the same policy config (the keys added
    since read as they were trained), batch, learning rate and warm-up; the step count is the record's."""
    from drift_policy.policies import config_from_dict, with_legacy_keys

    cfg = _experiment(name)
    old = json.loads((REPO / "eval" / "results" / record).read_text())
    assert config_from_dict(with_legacy_keys(old["config"]["policy"])).to_dict() == cfg.policy.to_dict()
    t = old["config"]["train"]
    assert (t["batch_size"], t["lr"], t["warmup_steps"]) == (cfg.train.batch_size, cfg.train.lr, cfg.train.warmup_steps)
    assert cfg.train.max_steps == (t["max_steps"] if not t["max_minutes"] else old["final_step"])


def test_the_command_line_flags_select_the_experiment(monkeypatch):
    from drift_policy import cli

    kw, rest = cli.config_flags(["--config-dir", "configs", "--config-name=pusht_keypoints_drift", "train.seed=1"])
    assert kw == {"config_name": "pusht_keypoints_drift", "config_dir": "configs"} and rest == ["train.seed=1"]
    assert cli.config_flags(["--config-dir=mine", "task=x"]) == ({"search_path": ["mine"]}, ["task=x"])
    seen = {}
    monkeypatch.setattr("drift_policy.train.train", lambda cfg: seen.setdefault("cfg", cfg))
    monkeypatch.chdir(REPO)
    cli.main(["train", "--config-dir", "configs", "--config-name", "pusht_keypoints_drift", "train.seed=1"])
    assert seen["cfg"].to_dict() == compose([*BENCH, "train.seed=1"]).to_dict()
