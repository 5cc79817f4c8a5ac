"""Data-parallel training under torchrun: 2 CPU processes on gloo."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from drift_policy.checkpoint import load_checkpoint
from drift_policy.config import Config
from drift_policy.distributed import Distributed, param_digest
from drift_policy.policies import make_policy
from drift_policy.runs import list_checkpoints

pytestmark = pytest.mark.slow   # every test here launches torchrun processes

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, pusht_zarr):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    tmp = tmp_path_factory.mktemp("ddp")
    run = tmp / "run"
    env = {**os.environ, "DRIFT_POLICY_DATA_ROOT": str(pusht_zarr.parents[1]), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "drift_policy", "train", "policy.backbone=tiny", "train.batch_size=4", "train.eval_episodes=0",
           "train.threads=1", "train.max_steps=10", "train.ckpt_every_steps=5", "train.log_every=1",
           f"train.run_dir={run}"]
    res = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return run, res


def test_two_ranks_finish_in_sync_and_rank0_writes(ddp_run):
    run, res = ddp_run
    assert res.stdout.count("done: 10 steps") == 1                      # only rank 0 reports and saves
    assert [int(p.stem.split("_")[1]) for p in list_checkpoints(run)] == [10, 5]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))                                   # one writer
    assert (run / "pretrained" / "model.safetensors").exists()

    ddp = json.loads((run / "ddp.json").read_text())
    assert ddp["world_size"] == 2 and ddp["backend"] == "gloo" and ddp["in_sync"]
    rank0, rank1 = ddp["digests"]
    assert rank0 == rank1                                                # identical parameters and EMA on both ranks

    # ... and they are the parameters in rank 0's final checkpoint
    ckpt = load_checkpoint(list_checkpoints(run)[0])
    policy = make_policy(Config.from_dict(ckpt["config"]).policy)
    policy.load_state_dict(ckpt["model"])
    assert param_digest(policy) == rank0["model"]
    # each rank drew its own noise: the checkpoint holds two different RNG states
    rng = ckpt["torch_rng"]
    assert isinstance(rng, list) and len(rng) == 2 and not torch.equal(rng[0], rng[1])
    # and training moved the weights away from the (shared) initialisation
    torch.manual_seed(0)
    init = make_policy(Config.from_dict(ckpt["config"]).policy)
    assert param_digest(init) != rank0["model"]


def test_resume_with_another_world_size_warns(ddp_run, monkeypatch):
    from drift_policy.train import train

    run, _ = ddp_run
    cfg = Config.from_dict(json.loads((run / "config.json").read_text()))
    with pytest.warns(UserWarning, match="written by 2 process.*resuming with 1"):
        train(cfg, run_dir=run, resume=True, progress=False)


def test_global_batch_is_split_evenly(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = Distributed("cpu")
    assert not d.enabled and d.loss_fn is not None
    d.world_size, d.rank = 2, 1
    x = torch.arange(8)
    assert d.shard(x).tolist() == [4, 5, 6, 7]
    d.check_batch_size(8)
    with pytest.raises(ValueError, match="batch_size=5 .* divisible by the number of processes \\(2\\)"):
        d.check_batch_size(5)
