"""The deployment API of Policy: predict_action, predict_action_chunk, select_action/reset, save/from_pretrained."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from drift_policy.errors import CheckpointError
from drift_policy.normalizer import Normalizer
from drift_policy.policies import DiffusionPolicy, DriftConfig, DriftPolicy, Policy, make_policy

TO, TA, TP, DA, OBS = 2, 8, 16, 2, 20


def _norm(keys=("obs", "action")):
    g = torch.Generator().manual_seed(0)
    n = Normalizer()
    if "obs" in keys:
        n.fit("obs", torch.rand(100, OBS, generator=g) * 512)
    if "action" in keys:
        n.fit("action", torch.rand(100, DA, generator=g) * 512)
    return n


@pytest.fixture
def policy():
    torch.manual_seed(0)
    return make_policy(DriftConfig(backbone="tiny"), _norm()).eval()


def count_forwards(policy) -> list:
    calls = []
    policy.model.register_forward_hook(lambda *a: calls.append(1))
    return calls


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_predict_action_is_one_forward_with_shapes(policy):
    calls = count_forwards(policy)
    obs = torch.rand(3, TO, OBS) * 512
    for n in (1, 2, 3):
        out = policy.predict_action(obs, generator=gen())
        assert len(calls) == n                                            # exactly 1 NFE per call
    assert out["action"].shape == (3, TA, DA) and out["action_pred"].shape == (3, TP, DA)
    torch.testing.assert_close(out["action"], out["action_pred"][:, TO - 1: TO - 1 + TA])
    assert torch.equal(policy.predict_action_chunk(obs, gen()), out["action"])
    # a dict observation is accepted too, and the same seed gives the same actions
    assert torch.equal(policy.predict_action({"obs": obs}, gen())["action"], out["action"])
    # different noise, different samples (the generator is really used)
    assert not torch.equal(policy.predict_action(obs, gen(1))["action"], out["action"])


def test_longer_history_uses_the_latest_steps(policy):
    hist = torch.rand(2, 5, OBS) * 512
    a = policy.predict_action(hist, gen())["action_pred"]
    b = policy.predict_action(hist[:, -TO:], gen())["action_pred"]
    assert torch.equal(a, b)


def test_save_and_from_pretrained_give_identical_actions(policy, tmp_path):
    path = policy.save_pretrained(tmp_path / "pretrained")
    assert {p.name for p in path.iterdir()} == {"config.json", "model.safetensors", "manifest.json"}
    assert json.loads((path / "config.json").read_text())["type"] == "drift"
    assert any(k.startswith("normalizer.") for k in load_file(str(path / "model.safetensors")))
    loaded = Policy.from_pretrained(path)
    assert type(loaded) is DriftPolicy and not loaded.training
    assert DriftPolicy.from_pretrained(path).config == policy.config
    obs = torch.rand(4, TO, OBS) * 512
    for seed in (0, 1):
        assert torch.equal(policy.predict_action(obs, gen(seed))["action_pred"],
                           loaded.predict_action(obs, gen(seed))["action_pred"])
    # the normaliser travelled with the weights
    for k, v in policy.normalizer.state_dict().items():
        assert torch.equal(v, loaded.normalizer.state_dict()[k])
    # and a whole select_action episode is the same
    ga, gb = gen(3), gen(3)
    policy.reset(), loaded.reset()
    for t in range(2 * TA + 3):
        o = torch.full((1, OBS), float(t))
        assert torch.equal(policy.select_action(o, ga), loaded.select_action(o, gb))
    with pytest.raises(TypeError, match="not a DiffusionPolicy"):
        DiffusionPolicy.from_pretrained(path)


def test_select_action_runs_the_generator_once_per_chunk(policy):
    calls = count_forwards(policy)
    policy.reset()
    g_ref = gen(5)
    got, chunks = [], []  # noqa: F841
    obs_seq = [torch.rand(2, OBS) * 512 for _ in range(3 * TA)]
    g = gen(5)
    for t, o in enumerate(obs_seq):
        got.append(policy.select_action(o, g))
        assert len(calls) == t // TA + 1                                   # a forward only when the queue empties
        assert got[-1].shape == (2, DA)
    assert len(calls) == 3
    # Each chunk is predict_action on the last To observations (the first repeated after reset), executed in order.
    for k in range(3):
        t = k * TA
        window = [obs_seq[max(0, t - TO + 1 + i)] for i in range(TO)]
        chunk = policy.predict_action(torch.stack(window, 1), g_ref)["action"]
        for j in range(TA):
            assert torch.equal(got[t + j], chunk[:, j])
    # one unbatched obs [obs_dim] is accepted
    policy.reset()
    assert policy.select_action(obs_seq[0][0], gen()).shape == (1, DA)
    with pytest.raises(ValueError, match="select_action takes one step"):
        policy.select_action(torch.rand(2, TO, OBS))


def test_reset_clears_queue_and_history(policy):
    calls = count_forwards(policy)
    policy.reset()
    first = policy.select_action(torch.zeros(1, OBS), gen(7))
    for _ in range(2):
        policy.select_action(torch.ones(1, OBS) * 100, gen())
    assert len(calls) == 1
    policy.reset()
    assert len(policy.executor) == 0 and not policy.executor.history
    again = policy.select_action(torch.zeros(1, OBS), gen(7))             # a fresh chunk, from a fresh history
    assert len(calls) == 2 and torch.equal(first, again)


def test_from_pretrained_missing_files_is_a_clear_error(policy, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        Policy.from_pretrained(tmp_path / "nowhere")
    path = policy.save_pretrained(tmp_path / "p")
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing model\.safetensors .*save_pretrained"):
        Policy.from_pretrained(path)
    path = policy.save_pretrained(tmp_path / "q")
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        Policy.from_pretrained(path)


def test_missing_normaliser_statistics_raise_keyerror(policy, tmp_path):
    # a policy whose normaliser never saw actions cannot act: KeyError, not a silent identity
    pol = make_policy(DriftConfig(backbone="tiny"), _norm(keys=("obs",))).eval()
    with pytest.raises(KeyError, match="no statistics for 'action'"):
        pol.predict_action(torch.rand(1, TO, OBS))
    # a folder whose weights lost the normaliser no longer matches its manifest: refused at load (issue 13 item 10)
    path = policy.save_pretrained(tmp_path / "p")
    state = {k: v for k, v in load_file(str(path / "model.safetensors")).items() if not k.startswith("normalizer.")}
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="does not match manifest.json|changed"):
        Policy.from_pretrained(path)


def test_a_refused_image_layout_never_enters_the_history():
    """Issue 38 item 10.2: a channels-last image on the first step after reset() is refused before it joins the
    history, so the next correct step acts normally instead of failing with a "batch size changed" message."""
    norm = Normalizer().fit("obs", torch.rand(50, 2) * 512).fit("action", torch.rand(50, DA) * 512)
    torch.manual_seed(0)
    pol = make_policy(DriftConfig(backbone="tiny", obs_dim=2, image_keys=("image",), image_shape=(3, 32, 32),
                                  crop_shape=(28, 28), vision_backbone="tiny"), norm).eval()
    obs = torch.rand(1, 2) * 512
    img = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    pol.reset()
    with pytest.raises(ValueError, match=r"'image' must be one step \[B=1, 3, 32, 32\].*channels last"):
        pol.select_action({"obs": obs, "image": img.permute(0, 2, 3, 1)}, gen())
    assert not pol.executor.history and len(pol.executor) == 0
    with pytest.raises(ValueError, match=r"must be one step \[B=1, 3, 32, 32\] \(channels first\), got \(2, 3"):
        pol.select_action({"obs": obs, "image": img.expand(2, -1, -1, -1)}, gen())
    a = pol.select_action({"obs": obs, "image": img}, gen())
    # the same action as a fresh episode's first step: nothing of the refused steps was kept
    pol.reset()
    assert a.shape == (1, DA) and torch.equal(a, pol.select_action({"obs": obs, "image": img}, gen()))
    # an unbatched step (obs [D], image [3, H, W]) is still accepted
    pol.reset()
    assert pol.select_action({"obs": obs[0], "image": img[0]}, gen()).shape == (1, DA)


def test_the_policies_are_importable_from_the_package_top(tmp_path):
    """``from drift_policy import ...`` gives the very classes of drift_policy.policies, and a pretrained folder
    loads through them; ``import drift_policy`` alone does not load torch (the command line starts fast)."""
    import subprocess
    import sys

    import drift_policy
    from drift_policy import DiffusionConfig, DriftConfig
    from drift_policy import DiffusionPolicy as TopDiffusion
    from drift_policy import DriftPolicy as TopDrift
    from drift_policy.policies import DiffusionConfig as D2
    from drift_policy.policies import DriftConfig as C2

    assert (TopDrift, TopDiffusion, DriftConfig, DiffusionConfig) == (DriftPolicy, DiffusionPolicy, C2, D2)
    assert {"DriftPolicy", "DiffusionPolicy", "DriftConfig", "DiffusionConfig"} <= set(drift_policy.__all__)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        drift_policy.Nope
    folder = make_policy(DriftConfig(backbone="tiny"), _norm()).save_pretrained(tmp_path / "p")
    assert isinstance(TopDrift.from_pretrained(folder), TopDrift)
    light = subprocess.run([sys.executable, "-c", "import sys, drift_policy; print('torch' in sys.modules)"],
                           capture_output=True, text=True, check=True)
    assert light.stdout.strip() == "False"
