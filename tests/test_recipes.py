"""Where a task's choices for a policy live must not change what any task trains.

``fixtures/resolved_configs.json`` holds the fully resolved config of every task x policy of the package's YAML
files, written before the choices moved (``fixtures/resolved_configs.py``); every combination must resolve to it
again, but for the keys removed since (issue 38: each lost when measured, its record kept in eval/results).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REMOVED = {"neighbor_own_anchor", "kernel_scale", "neighbor_negatives", "cond_mlp", "obs_noise"}
# Keys added since, each with the default that leaves every task training as before.
ADDED_TRAIN = {"encoder_bf16": False}          # issue 39: the image encoder's trunk in bfloat16 (off)
ADDED_DRIFT = {"neighbor_key": "obs"}           # issue 39: neighbours by the observation, as before
ADDED_POLICY = {"image_kp_origin": [], "image_kp_scale": 0.0}   # issue 39: keypoints in the crop's frame, as before
# Recipes added since, each a deliberate change of what its task trains, named here key by key so that nothing
# else may change with it (recipe/pusht_image_drift.yaml and blockpush_lowdim_drift.yaml, both drift policy types).
PIXELS = {"policy": {"action_anchor": [0, 1], "per_dim_scale": True, "noise_scale": 0.5},
          "train": {"lr": 6e-4, "warmup_steps": 500}}
BLOCKPUSH = {"policy": {"action_anchor": [8, 9], "per_dim_scale": True, "neighbor_same_episode": False,
                        "noise_scale": 0.5}, "train": {"lr": 6e-4, "warmup_steps": 500}}    # issue 40
RECIPES_ADDED = {"pusht_image/drift_unet": PIXELS, "pusht_image/drift_transformer": PIXELS,
                 "blockpush_lowdim/drift_unet": BLOCKPUSH, "blockpush_lowdim/drift_transformer": BLOCKPUSH}


def _script():
    spec = importlib.util.spec_from_file_location("resolved_configs", FIXTURES / "resolved_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _without_removed(d: dict) -> dict:
    if "policy" in d:
        d = {**d, "policy": {k: v for k, v in d["policy"].items() if k not in REMOVED}}
    return d


@pytest.fixture(scope="module")
def resolved() -> dict:
    return _script().resolve_all()


def test_every_task_and_policy_resolves_as_before(resolved):
    expected = json.loads((FIXTURES / "resolved_configs.json").read_text())
    assert sorted(resolved) == sorted(expected)          # no task or policy YAML appeared or vanished unnoticed
    for name in expected:
        want = {**expected[name], "train": {**ADDED_TRAIN, **expected[name]["train"]}}
        want["policy"] = {**ADDED_POLICY, **want["policy"]}
        if want["policy"]["type"] == "drift":
            want["policy"] = {**ADDED_DRIFT, **want["policy"]}
        for section, keys in RECIPES_ADDED.get(name, {}).items():
            want[section] = {**want[section], **keys}
        assert _without_removed(resolved[name]) == _without_removed(want), name


def test_a_resolved_config_resolves_to_itself(resolved):
    """config.json holds the resolved values: read back, it is the same config (a resumed run is the same run)."""
    from drift_policy.config import Config

    for name in ("pusht_keypoints/drift_unet", "can_lowdim/drift_unet", "pusht_image/diffusion_unet"):
        assert json.loads(json.dumps(Config.from_dict(resolved[name]).to_dict())) == resolved[name], name


def test_the_push_t_drift_default_trains_32_x_2_at_6e_4_with_500_warm_up_steps(resolved):
    d = resolved["pusht_keypoints/drift_unet"]
    assert (d["train"]["batch_size"], d["policy"]["n_noise"]) == (32, 2)
    assert (d["train"]["lr"], d["train"]["warmup_steps"]) == (6e-4, 500)
    assert (resolved["pusht_keypoints/diffusion_unet"]["train"]["batch_size"],
            resolved["pusht_keypoints/diffusion_unet"]["train"]["lr"]) == (64, 3e-4)


# ---- the recipes: one YAML file per task and policy type ----------------------------------------------------------
def _recipe_files():
    from drift_policy.paths import CONFIG_DIR

    return sorted((CONFIG_DIR / "recipe").glob("*.yaml"))


def test_every_recipe_is_selected_by_a_task_and_a_policy_type_and_holds_only_what_differs():
    import yaml
    from hydra.core.config_store import ConfigStore

    from drift_policy.config import compose, register_schemas
    from drift_policy.paths import CONFIG_DIR
    from drift_policy.policies import POLICIES

    tasks = {p.stem for p in (CONFIG_DIR / "task").glob("*.yaml")}
    register_schemas()
    store = ConfigStore.instance()
    files = _recipe_files()
    assert {f.stem for f in files} >= {"pusht_keypoints_drift", "can_lowdim_drift"}
    for f in files:
        task, _, kind = f.stem.rpartition("_")
        assert task in tasks and kind in POLICIES, f.name             # a name no task and policy type would select
        values = yaml.safe_load(f.read_text()) or {}
        for ref in values.pop("defaults", []):
            if ref != "_self_":
                values.update(yaml.safe_load((CONFIG_DIR / f"{ref.lstrip('/')}.yaml").read_text()))
        assert set(values) <= {"policy", "train"}, f.name
        for group, schema in (("policy", f"schema/policy/{kind}.yaml"), ("train", "schema/train.yaml")):
            defaults = store.load(schema).node
            for key, value in values.get(group, {}).items():
                assert key in defaults and defaults[key] != value, f"{f.name}: {group}.{key} repeats the default"
        cfg = compose([f"task={task}", f"policy={kind}_unet"])            # selected by default, and it took effect
        for group, keys in values.items():
            for key, value in keys.items():
                got = getattr(getattr(cfg, group), key)
                assert (list(got) if isinstance(got, tuple) else got) == value, (f.name, key)


def test_the_push_t_recipe_anchors_on_the_dims_the_family_says_are_the_agent():
    from drift_policy.config import compose
    from drift_policy.tasks import family

    cfg = compose([])
    assert cfg.policy.action_anchor == cfg.policy.obs_origin == family(cfg.task).agent_dims(cfg.task) == (18, 19)


def test_a_recipe_can_be_chosen_or_left_out_and_a_task_of_ones_own_can_have_one(tmp_path):
    from drift_policy.config import compose
    from drift_policy.errors import ConfigError

    assert compose(["task=pusht_image", "recipe=pusht_keypoints_drift", "task.obs_keys=[keypoint,agent_pos]",
                    "task.image_keys=[]"]).policy.noise_scale == 0.5         # named explicitly
    for off in ("recipe=null", "~recipe"):
        cfg = compose([off])
        assert (cfg.policy.noise_scale, cfg.policy.action_anchor, cfg.train.lr) == (1.0, (), 3e-4)
    with pytest.raises(ConfigError, match="recipe"):
        compose(["recipe=no_such_recipe"])
    (tmp_path / "task").mkdir()
    (tmp_path / "recipe").mkdir()
    (tmp_path / "task" / "my_pusht.yaml").write_text("defaults:\n  - /schema/task/pusht@_here_\n  - _self_\nname: my_pusht\n")
    (tmp_path / "recipe" / "my_pusht_drift.yaml").write_text("# @package _global_\npolicy:\n  noise_scale: 0.25\n")
    assert compose(["task=my_pusht"], search_path=[tmp_path]).policy.noise_scale == 0.25
    assert compose(["task=my_pusht", "policy.noise_scale=0.75"], search_path=[tmp_path]).policy.noise_scale == 0.75
    assert compose(["task=my_pusht", "policy=diffusion_unet"], search_path=[tmp_path]).policy.type == "diffusion"
