"""A new task family is one module and one YAML file: a toy family (tests/toy_family.py) trained, evaluated
during training (in a rollout worker process) and re-evaluated from the command line, through the public API
only, without touching evaluation.py, runner.py or bench.py."""
import json

import pytest

from drift_policy.cli import main
from drift_policy.config import compose
from drift_policy.errors import ConfigError
from drift_policy.runs import eval_files, read_config
from drift_policy.tasks import families, family, register_family, task_spaces
from drift_policy.train import train

TASK_YAML = """\
defaults:
  - /schema/task/toy_point@_here_
  - _self_
name: point_reach
dataset: unused
obs_keys: [state]
max_steps: 20
"""
TRAIN = ["policy=drift_unet", "policy.backbone=tiny", "policy.horizon=8", "policy.n_action_steps=4",
         "train.max_steps=12", "train.max_minutes=0", "train.batch_size=16", "train.threads=1", "train.log_every=4",
         "train.eval_episodes=3", "train.eval_workers=1", "train.eval_every_minutes=0", "train.ckpt_every_steps=1000"]


@pytest.fixture()
def config_dir(tmp_path, monkeypatch):
    # Found through $DRIFT_POLICY_TASK_MODULES, as a family outside the package would be.
    monkeypatch.setenv("DRIFT_POLICY_TASK_MODULES", "toy_family")
    (tmp_path / "configs" / "task").mkdir(parents=True)
    (tmp_path / "configs" / "task" / "point_reach.yaml").write_text(TASK_YAML)
    return tmp_path / "configs"


def test_a_registered_family_trains_and_evaluates_through_the_public_api(config_dir, tmp_path):
    assert "toy_point" in families()
    cfg = compose(["task=point_reach", *TRAIN, f"train.run_dir={tmp_path / 'run'}"], search_path=[config_dir])
    assert cfg.task.env == "toy_point" and cfg.task.options == {"n_demos": 24}     # the family's option default
    assert (cfg.policy.obs_dim, cfg.policy.action_dim) == (2, 1) == tuple(task_spaces(cfg.task).values())[:2]

    run = train(cfg, progress=False)
    (ev,) = eval_files(run)
    res = json.loads(ev.read_text())
    assert res["task"] == "point_reach" and res["n_episodes"] == 3 and res["num_workers"] == 1
    assert res["progress_score"] == res["mean_score"]                  # the family's score alias
    assert all(0 <= e["max_reward"] <= 1 and "max_gap" in e and 1 <= e["steps"] <= 20 for e in res["per_episode"])
    assert read_config(run).task.env == "toy_point"

    out = tmp_path / "cli_eval.json"
    main(["eval", f"checkpoint={run}", "episodes=3", "workers=0", f"out={out}"])
    again = json.loads(out.read_text())
    assert again["task"] == "point_reach" and [e["seed"] for e in again["per_episode"]] == [100000, 100001, 100002]
    # The same EMA weights, seeds and sampling noise, in-process instead of in a worker: the same episodes.
    assert again["per_episode"] == res["per_episode"]


def test_the_family_validates_its_own_options(config_dir):
    with pytest.raises(ConfigError, match="task.options.n_demos must be >= 2"):
        compose(["task=point_reach", "task.options.n_demos=1"], search_path=[config_dir])
    with pytest.raises(ConfigError, match=r"unknown key\(s\) task.options.colour"):
        compose(["task=point_reach", "+task.options.colour=red"], search_path=[config_dir])
    with pytest.raises(ConfigError, match="obs_keys for toy_point"):
        compose(["task=point_reach", "task.obs_keys=[x]"], search_path=[config_dir])


def test_register_family_takes_a_named_family():
    with pytest.raises(ValueError, match="TaskFamily instance with a name"):
        register_family(object())
    assert family("pusht").control_hz == 10.0
    with pytest.raises(ConfigError, match="task.env must be one of"):
        family("no_such_family")
