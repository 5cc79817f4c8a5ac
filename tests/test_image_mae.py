"""MAE pre-training of the feature encoder through the data-parallel path (``image/mae.py``), in one process.
The two-process run under torchrun is in tests/test_image_cluster.py (slow)."""
import pytest
import torch

from drift_policy.checkpoint import load_checkpoint
from drift_policy.errors import ConfigError
from drift_policy.image.config import load_config
from drift_policy.image.mae import pretrain_encoder, resume_dir

quiet = lambda *a, **k: None          # noqa: E731


def _cfg(path, *extra):
    return load_config(None, ["data.name=synthetic", "encoder.widths=[8,16]", "encoder.mae_batch=16",
                              "encoder.mae_max_steps=6", "encoder.mae_minutes=0", f"encoder.path={path}", *extra])


def test_steps_resume_bit_exactly_and_the_file_is_what_training_loads(tmp_path):
    from drift_policy.image.train import load_encoder

    stats = pretrain_encoder(_cfg(tmp_path / "a.pt"), log=quiet)
    assert stats["steps"] == 6 and stats["world"] == 1
    assert pretrain_encoder(_cfg(tmp_path / "b.pt", "encoder.mae_launch_steps=4", "encoder.mae_save_every=2"),
                            log=quiet) is None                                  # stopped early: no encoder yet
    assert not (tmp_path / "b.pt").exists() and (resume_dir(tmp_path / "b.pt") / "mae.pt").exists()
    assert load_checkpoint(resume_dir(tmp_path / "b.pt") / "mae.pt")["step"] == 4
    assert pretrain_encoder(_cfg(tmp_path / "b.pt"), log=quiet)["steps"] == 6
    assert not resume_dir(tmp_path / "b.pt").exists()
    a, b = load_checkpoint(tmp_path / "a.pt")["encoder"], load_checkpoint(tmp_path / "b.pt")["encoder"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert pretrain_encoder(_cfg(tmp_path / "a.pt"), log=quiet) is None         # cached: nothing to do
    enc = load_encoder(_cfg(tmp_path / "a.pt"), 1)
    assert all(torch.equal(enc.state_dict()[k], a[k]) for k in a)


def test_the_global_batch_must_split_evenly_and_the_launch_guard_be_positive(tmp_path):
    from drift_policy.image.mae import _check

    with pytest.raises(ConfigError, match="mae_launch_steps"):
        pretrain_encoder(_cfg(tmp_path / "c.pt", "encoder.mae_launch_steps=0"), log=quiet)
    with pytest.raises(ConfigError, match="divisible by the 3 processes"):
        _check(_cfg(tmp_path / "c.pt")["encoder"], 3)
    assert not (tmp_path / "c.pt").exists()
