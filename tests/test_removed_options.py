"""Options removed after runs were saved with them (issue 38: each lost when measured, its record kept in
eval/results) still load from an old config.json, checkpoint or pretrained folder: silently at the value the code
now always uses, with a warning naming a training-only option set otherwise (the weights act the same), and with a
one-line ConfigError for one that changed the network."""
from __future__ import annotations

import hashlib
import json
import warnings

import pytest
import torch
from safetensors.torch import load, save

from drift_policy.config import Config, compose
from drift_policy.errors import ConfigError
from drift_policy.normalizer import Normalizer
from drift_policy.policies import DiffusionConfig, DriftConfig, Policy, make_policy

# What a config.json of the drift policy held for the removed keys when they were at their defaults.
OLD_DEFAULTS = {"kernel_scale": "batch", "neighbor_negatives": 0, "neighbor_own_anchor": False, "cond_mlp": 0,
                "obs_noise": 0.0}
# Another value of each removed training-only option (and the removed value 'both' of drift_groups).
OLD_TRAINING = {"kernel_scale": "step", "neighbor_negatives": 1, "neighbor_own_anchor": True, "obs_noise": 0.02,
                "drift_groups": "both"}


def _policy(cfg) -> Policy:
    g = torch.Generator().manual_seed(0)
    norm = Normalizer().fit("obs", torch.rand(100, 20, generator=g) * 512).fit("action", torch.rand(100, 2, generator=g) * 512)
    torch.manual_seed(0)
    return make_policy(cfg, norm).eval()


def _as_old_folder(folder, extra: dict):
    """Rewrite a pretrained folder as an older version wrote it: config.json and the weights' own record of the
    config both with ``extra`` keys, and the manifest to match."""
    weights = (folder / "model.safetensors").read_bytes()
    cfg = json.dumps({**json.loads((folder / "config.json").read_text()), **extra})
    files = {"config.json": cfg.encode(), "model.safetensors": save(load(weights), metadata={"config": cfg})}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    manifest = {n: {"sha256": hashlib.sha256(d).hexdigest(), "bytes": len(d)} for n, d in files.items()}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_an_old_config_json_at_the_removed_defaults_loads_silently_as_today():
    today = compose([]).to_dict()
    old = {**today, "policy": {**today["policy"], **OLD_DEFAULTS}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")                          # not even a warning
        assert Config.from_dict(old).to_dict() == today
    diffusion = compose(["policy=diffusion_unet"]).to_dict()
    old = {**diffusion, "policy": {**diffusion["policy"], "cond_mlp": 0, "obs_noise": 0.0}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Config.from_dict(old).to_dict() == diffusion


def test_an_old_config_json_with_another_training_only_value_loads_with_a_warning_naming_it(tmp_path):
    from drift_policy import runs

    today = compose([]).to_dict()
    old = {**today, "policy": {**today["policy"], **OLD_DEFAULTS, **OLD_TRAINING}}
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.warns(UserWarning) as caught:
        cfg = runs.read_config(tmp_path)
    message = " ".join(str(w.message) for w in caught)
    assert str(tmp_path / "config.json") in message
    for key, value in OLD_TRAINING.items():
        assert f"policy.{key}={value!r}" in message
    assert "cond_mlp" not in message                            # the default passes silently
    assert cfg.to_dict() == today                               # the keys dropped, 'both' read as per-step groups


def test_an_old_pretrained_folder_with_training_only_options_loads_and_acts_the_same(tmp_path):
    policy = _policy(DriftConfig(backbone="tiny", action_anchor=(18, 19)))
    folder = _as_old_folder(policy.save_pretrained(tmp_path / "p"), {**OLD_DEFAULTS, **OLD_TRAINING})
    with pytest.warns(UserWarning, match="policy.kernel_scale='step'"):
        loaded = Policy.from_pretrained(folder)
    assert loaded.config.drift_groups == "per_step" and not hasattr(loaded.config, "kernel_scale")
    obs = torch.rand(3, 2, 20) * 512
    torch.testing.assert_close(loaded.predict_action(obs, torch.Generator().manual_seed(1))["action"],
                               policy.predict_action(obs, torch.Generator().manual_seed(1))["action"])
    # config.json must still tell what the weights were trained with, removed options included
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "kernel_scale": "batch"}))
    data = (folder / "config.json").read_bytes()
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["config.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with warnings.catch_warnings(), pytest.raises(Exception, match="contradicts the weights.*kernel_scale='step'"):
        warnings.simplefilter("ignore")
        Policy.from_pretrained(folder)


@pytest.mark.parametrize("cfg_cls", [DriftConfig, DiffusionConfig])
def test_a_folder_trained_with_a_removed_network_option_is_a_one_line_config_error(cfg_cls, tmp_path, capsys):
    from drift_policy.cli import main

    folder = _as_old_folder(_policy(cfg_cls(backbone="tiny")).save_pretrained(tmp_path / "p"), {"cond_mlp": 256})
    with pytest.raises(ConfigError, match=f"{folder} was trained with a removed option, policy.cond_mlp=256"):
        Policy.from_pretrained(folder)
    with pytest.raises(SystemExit) as exit_:
        main(["eval", f"checkpoint={folder}", f"out={tmp_path / 'eval.json'}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and "removed option" in err
    today = compose([]).to_dict()
    with pytest.raises(ConfigError, match="runs/old/config.json was trained with a removed option, policy.cond_mlp=64"):
        Config.from_dict({**today, "policy": {**today["policy"], "cond_mlp": 64}}, where="runs/old/config.json")


def test_a_new_config_cannot_ask_for_a_removed_option():
    with pytest.raises(ConfigError, match="policy.kernel_scale"):
        compose(["policy.kernel_scale=step"])
    with pytest.raises(ConfigError, match="policy.drift_groups"):
        compose(["policy.drift_groups=both"])
