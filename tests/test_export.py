"""Export of the drift generator + normaliser to TorchScript and ONNX: parity with eager PyTorch."""
import json
import warnings

import numpy as np
import pytest
import torch

from drift_policy.export import ExportablePolicy, example_inputs, export_policy, load_torchscript
from drift_policy.normalizer import Normalizer
from drift_policy.policies import DiffusionConfig, DriftConfig, make_policy


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    norm = Normalizer().fit("obs", torch.rand(100, 20, generator=g) * 512).fit("action", torch.rand(100, 2, generator=g) * 512)
    return make_policy(DriftConfig(backbone="tiny"), norm).eval()


def eager(policy, obs, seed):
    """What the policy does in PyTorch, with noise drawn from a seeded generator."""
    return policy.predict_action(obs, generator=torch.Generator().manual_seed(seed))


def same_noise(policy, batch, seed):
    c = policy.config
    return torch.randn(batch, c.horizon, c.action_dim, generator=torch.Generator().manual_seed(seed))


def assert_parity(policy, action, action_pred, ref):
    # Compare in normalised units ([-1, 1]) with atol 1e-4, and in pixels to 1e-3 px.
    for got, want in ((action, ref["action"]), (action_pred, ref["action_pred"])):
        got = torch.as_tensor(np.asarray(got))
        assert got.shape == want.shape
        torch.testing.assert_close(policy.normalizer.normalize("action", got),
                                   policy.normalizer.normalize("action", want), atol=1e-4, rtol=0)
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-5)


def test_wrapper_is_predict_action_with_explicit_noise(policy):
    obs, _ = example_inputs(policy, batch=3)
    ref = eager(policy, obs, seed=1)
    with torch.no_grad():
        action, action_pred = ExportablePolicy(policy)(obs, same_noise(policy, 3, seed=1))
    assert torch.equal(action_pred, ref["action_pred"]) and torch.equal(action, ref["action"])


def test_torchscript_parity(policy, tmp_path):
    out = export_policy(policy, tmp_path / "policy.pt", "torchscript")
    meta = json.loads((tmp_path / "policy.pt.json").read_text())
    assert meta["format"] == "torchscript" and meta["inputs"]["obs"] == ["batch", 2, 20]
    ts = load_torchscript(out)
    for batch, seed in ((1, 0), (5, 3)):                                    # the batch axis is dynamic
        obs, _ = example_inputs(policy, batch=batch, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            action, action_pred = ts(obs, same_noise(policy, batch, seed))
        assert_parity(policy, action, action_pred, eager(policy, obs, seed))


def test_onnx_parity(policy, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import onnx

    from drift_policy.export import OnnxPolicy

    out = export_policy(policy, tmp_path / "policy.onnx", "onnx")
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["obs", "noise"]
    assert [o.name for o in model.graph.output] == ["action", "action_pred"]
    sess = OnnxPolicy(out)
    for batch, seed in ((1, 0), (4, 2)):
        obs, _ = example_inputs(policy, batch=batch, generator=torch.Generator().manual_seed(seed))
        action, action_pred = sess(obs.numpy(), same_noise(policy, batch, seed).numpy())
        assert action.dtype == np.float32
        assert_parity(policy, action, action_pred, eager(policy, obs, seed))


def test_export_cli_from_a_pretrained_folder(policy, tmp_path, capsys):
    from drift_policy.cli import main

    folder = policy.save_pretrained(tmp_path / "pretrained")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["export", f"checkpoint={folder}", "format=torchscript", f"out={tmp_path / 'cli.pt'}"])
    ts = load_torchscript(tmp_path / "cli.pt")
    obs, _ = example_inputs(policy, batch=2)
    with torch.no_grad():
        action, action_pred = ts(obs, same_noise(policy, 2, 0))
    assert_parity(policy, action, action_pred, eager(policy, obs, 0))
    with pytest.raises(SystemExit) as e:
        main(["export", f"checkpoint={folder}", f"out={tmp_path / 'x'}", "format=tflite"])
    assert e.value.code == 2 and "format must be onnx or torchscript" in capsys.readouterr().err


def test_only_drift_policies_export(policy, tmp_path):
    pytest.importorskip("diffusers")
    diff = make_policy(DiffusionConfig(backbone="tiny"), policy.normalizer)
    with pytest.raises(ValueError, match="only one-step drift policies"):
        export_policy(diff, tmp_path / "d.pt", "torchscript")
    bare = make_policy(DriftConfig(backbone="tiny"), Normalizer().fit("obs", torch.rand(10, 20)))
    with pytest.raises(KeyError, match="no statistics for 'action'"):
        export_policy(bare, tmp_path / "b.pt", "torchscript")
