"""Export of the drift generator + normaliser to TorchScript and ONNX: parity with eager PyTorch."""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from drift_policy.errors import ConfigError
from drift_policy.export import ExportablePolicy, cmd_export, example_inputs, export_policy, load_torchscript
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
    assert e.value.code == 2 and "format must be one of onnx, torchscript, aoti" in capsys.readouterr().err


def test_only_drift_policies_export(policy, tmp_path):
    pytest.importorskip("diffusers")
    diff = make_policy(DiffusionConfig(backbone="tiny"), policy.normalizer)
    with pytest.raises(ValueError, match="only one-step drift policies"):
        export_policy(diff, tmp_path / "d.pt", "torchscript")
    bare = make_policy(DriftConfig(backbone="tiny"), Normalizer().fit("obs", torch.rand(10, 20)))
    with pytest.raises(KeyError, match="no statistics for 'action'"):
        export_policy(bare, tmp_path / "b.pt", "torchscript")



@pytest.fixture(scope="module")
def aoti_package(tmp_path_factory):
    """One tiny export for the module (a minute of C++ compiling), through the CLI: the default Push-T keypoints
    conditioning (obs_origin, action_anchor). Returns (policy, package path)."""
    from drift_policy.cli import main

    tmp = tmp_path_factory.mktemp("aoti")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    norm = Normalizer().fit("obs", torch.rand(100, 20, generator=g) * 512).fit("action", torch.rand(100, 2, generator=g) * 512)
    pol = make_policy(DriftConfig(backbone="tiny", obs_origin=(18, 19), action_anchor=(18, 19)), norm).eval()
    folder = pol.save_pretrained(tmp / "pretrained")
    with pytest.raises(ConfigError, match=r"must end in \.pt2"):
        cmd_export([f"checkpoint={folder}", "format=aoti", f"out={tmp / 'policy.onnx'}"])
    out = tmp / "policy.pt2"
    main(["export", f"checkpoint={folder}", "format=aoti", f"out={out}"])
    return pol, out


@pytest.mark.slow
def test_aoti_package_matches_the_policy_and_loads_with_torch_alone(aoti_package, tmp_path):
    """Parity at batch 1 and 5 (dynamic batch), then a fresh interpreter that loads the package with
    torch._inductor.aoti_load_package and never imports drift_policy."""
    import os
    import subprocess
    import sys

    from drift_policy.export import AotiPolicy

    pol, out = aoti_package
    meta = json.loads(Path(str(out) + ".json").read_text())
    assert meta["format"] == "aoti" and meta["policy_config"]["obs_origin"] == [18, 19]
    model = AotiPolicy(out)
    for batch, seed in ((1, 0), (5, 3)):
        obs, _ = example_inputs(pol, batch=batch, generator=torch.Generator().manual_seed(seed))
        action, action_pred = model(obs, same_noise(pol, batch, seed))
        assert_parity(pol, action, action_pred, eager(pol, obs, seed))

    obs, _ = example_inputs(pol, batch=2, generator=torch.Generator().manual_seed(4))
    torch.save({"obs": obs, "noise": same_noise(pol, 2, 4)}, tmp_path / "inputs.pt")
    code = ("import sys, torch\n"
            "m = torch._inductor.aoti_load_package(sys.argv[1])\n"
            "x = torch.load(sys.argv[2])\n"
            "action, action_pred = m(x['obs'], x['noise'])\n"
            "assert 'drift_policy' not in sys.modules\n"
            "torch.save({'action': action, 'action_pred': action_pred}, sys.argv[3])\n")
    subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "inputs.pt"), str(tmp_path / "outputs.pt")],
                   cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""}, check=True, timeout=300)
    got = torch.load(tmp_path / "outputs.pt")
    assert_parity(pol, got["action"], got["action_pred"], eager(pol, obs, 4))


@pytest.mark.slow
def test_aoti_package_runs_from_cpp(aoti_package, tmp_path):
    """examples/aoti_policy.cpp, built against this torch's libtorch, gives the policy's actions."""
    import os
    import shutil
    import subprocess

    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler ({cxx})")
    pol, out = aoti_package
    t = Path(torch.__file__).parent
    exe = tmp_path / "aoti_policy"
    src = Path(__file__).resolve().parents[1] / "examples" / "aoti_policy.cpp"
    subprocess.run([cxx, "-O1", "-std=c++17", str(src), f"-I{t / 'include'}",
                    f"-I{t / 'include' / 'torch' / 'csrc' / 'api' / 'include'}", f"-L{t / 'lib'}", "-ltorch",
                    "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{t / 'lib'}", "-o", str(exe)], check=True, timeout=600)
    c = pol.config
    obs, _ = example_inputs(pol, batch=3, generator=torch.Generator().manual_seed(6))
    noise = same_noise(pol, 3, 6)
    obs.numpy().astype("<f4").tofile(tmp_path / "obs.f32")
    noise.numpy().astype("<f4").tofile(tmp_path / "noise.f32")
    subprocess.run([str(exe), str(out), str(tmp_path / "obs.f32"), str(tmp_path / "noise.f32"),
                    str(tmp_path / "pred.f32"), "3", str(c.n_obs_steps), str(c.obs_dim), str(c.horizon),
                    str(c.action_dim)], check=True, timeout=300)
    pred = torch.from_numpy(np.fromfile(tmp_path / "pred.f32", dtype="<f4").reshape(3, c.horizon, c.action_dim))
    ref = eager(pol, obs, 6)
    start = c.n_obs_steps - 1
    assert_parity(pol, pred[:, start: start + c.n_action_steps], pred, ref)


# ---- image policies (issue 39): the encoder inside the export, frames as uint8 inputs ---------------------------
@pytest.fixture(scope="module", params=["shallow", "tiny", "tiny_kp_origin"])
def image_policy(request):
    """A drift policy from pixels (one 96x96 camera + the agent position), with the cheaper shallow trunk, the
    tiny ResNet, and the tiny ResNet with its keypoints measured from the agent (``image_kp_origin``); eval mode:
    the centre crop, as in evaluation."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    norm = Normalizer().fit("obs", torch.rand(100, 2, generator=g) * 512).fit("action", torch.rand(100, 2, generator=g) * 512)
    origin = {"image_kp_origin": (0, 1), "image_kp_scale": 96 / 512} if request.param.endswith("kp_origin") else {}
    cfg = DriftConfig(backbone="tiny", obs_dim=2, image_keys=("image",),
                      vision_backbone=request.param.removesuffix("_kp_origin"), **origin)
    return make_policy(cfg, norm).eval()


def image_eager(policy, obs, image, seed):
    return policy.predict_action({"obs": obs, "image": image}, generator=torch.Generator().manual_seed(seed))


def test_image_policy_wrapper_inputs_and_metadata(image_policy, tmp_path):
    obs, noise, image = example_inputs(image_policy, batch=3)
    assert image.dtype == torch.uint8 and image.shape == (3, 2, 3, 96, 96)
    ref = image_eager(image_policy, obs, image, seed=1)
    with torch.no_grad():
        action, action_pred = ExportablePolicy(image_policy)(obs, same_noise(image_policy, 3, seed=1), image)
    assert torch.equal(action_pred, ref["action_pred"]) and torch.equal(action, ref["action"])
    export_policy(image_policy, tmp_path / "p.pt", "torchscript")
    meta = json.loads((tmp_path / "p.pt.json").read_text())
    assert meta["inputs"]["image"] == ["batch", 2, 3, 96, 96] and meta["policy_config"]["vision_backbone"]
    with pytest.raises(ConfigError, match="aoti exports low-dim policies only"):
        export_policy(image_policy, tmp_path / "p.pt2", "aoti")


def test_image_policy_torchscript_parity(image_policy, tmp_path):
    ts = load_torchscript(export_policy(image_policy, tmp_path / "policy.pt", "torchscript"))
    for batch, seed in ((1, 0), (4, 3)):                                    # the batch axis is dynamic
        obs, _, image = example_inputs(image_policy, batch=batch, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            action, action_pred = ts(obs, same_noise(image_policy, batch, seed), image)
        assert_parity(image_policy, action, action_pred, image_eager(image_policy, obs, image, seed))


def test_image_policy_onnx_parity(image_policy, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import onnx

    from drift_policy.export import OnnxPolicy

    out = export_policy(image_policy, tmp_path / "policy.onnx", "onnx")
    # The exporter restores its wrapper's mode on the whole tree: the policy stays in eval mode (centre crop).
    assert not any(m.training for m in image_policy.modules())
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["obs", "noise", "image"]
    sess = OnnxPolicy(out)
    for batch, seed in ((1, 0), (3, 2)):
        obs, _, image = example_inputs(image_policy, batch=batch, generator=torch.Generator().manual_seed(seed))
        action, action_pred = sess(obs.numpy(), same_noise(image_policy, batch, seed).numpy(), image.numpy())
        assert_parity(image_policy, action, action_pred, image_eager(image_policy, obs, image, seed))
    with pytest.raises(ValueError, match="camera input"):
        sess(obs.numpy(), same_noise(image_policy, batch, seed).numpy())


def test_image_policy_export_cli_from_a_pretrained_folder(image_policy, tmp_path):
    from drift_policy.cli import main

    folder = image_policy.save_pretrained(tmp_path / "pretrained")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["export", f"checkpoint={folder}", "format=torchscript", f"out={tmp_path / 'cli.pt'}"])
    ts = load_torchscript(tmp_path / "cli.pt")
    obs, _, image = example_inputs(image_policy, batch=2)
    with torch.no_grad():
        action, action_pred = ts(obs, same_noise(image_policy, 2, 0), image)
    assert_parity(image_policy, action, action_pred, image_eager(image_policy, obs, image, 0))
