"""The one-machine-to-cluster path (issue 43 item 7) in miniature: `encode`, 3 training steps and a 64-sample FID,
each under torchrun with 2 gloo processes, on a fake ImageNet folder. A tiny random Inception-shaped TorchScript
stands in for the real FID weights (tests/test_image_fid.py tests the real loader's errors)."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from test_image_fid import save_tiny_inception
from test_image_store import make_fake_imagenet, make_tiny_vae


def run_group(cmd, timeout):
    """subprocess.run in its own process group, killed whole on timeout (torchrun's workers included)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _torchrun(*args, timeout=900):      # a hang guard: a few seconds each on an idle machine
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", "-m", "drift_policy.image", *map(str, args)]
    r = run_group(cmd, timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow
def test_encode_train_fid_with_two_gloo_processes(tmp_path):
    src = make_fake_imagenet(tmp_path / "imagenet" / "train", classes=("n01", "n02", "n03", "n04"), per_class=4)
    vae = make_tiny_vae(tmp_path / "vae")
    inception = save_tiny_inception(tmp_path / "inception.pt")
    store = tmp_path / "store"

    log = _torchrun("encode", src, store, f"vae={vae}", "size=16", "shard=3", "batch=3")
    index = json.loads((store / "index.json").read_text())
    assert index["count"] == 32 and len(index["shards"]) == 6                   # 16 images + mirrors, 6 shards
    assert "rank 0: 3 shards encoded" in log and "rank 1: 3 shards encoded" in log   # each rank its share

    run = tmp_path / "run"
    log = _torchrun("train", "data.name=store", f"data.root={store}", "data.num_classes=4", "data.image_size=16",
                    "latent.kind=kl", "model.patch=2", "model.hidden=32", "model.depth=1", "model.heads=2",
                    "model.n_context_tokens=2", "encoder.use=false", "drift.labels_per_step=4", "drift.n_gen=4",
                    "drift.n_pos=2", "drift.n_unc=2", "drift.per_class_queue=4", "drift.global_queue=8",
                    "drift.push_per_step=4", "train.steps=3", "train.minutes=0", f"train.out={run}")
    ddp = json.loads(next(x for x in log.splitlines() if x.startswith("ddp check "))[len("ddp check "):])
    assert ddp["world"] == 2 and ddp["param_max_diff"] == 0.0
    assert json.loads((run / "checkpoint.pt.json").read_text())["step"] == 3
    assert (run / "state" / "rank0.pt").exists() and (run / "state" / "rank1.pt").exists()

    _torchrun("fid", run, f"inception={inception}", f"ref={src}", "n=64", "batch=16", "alphas=[1.0,2.0]")
    res = json.loads((run / "fid.json").read_text())
    assert res["world"] == 2 and res["n"] == 64 and res["ref_n"] == 16
    assert set(res["alphas"]) == {"1", "2"} and all(v["fid"] > 0 for v in res["alphas"].values())


def _mae_args(store, path, *extra):
    return ["data.name=store", f"data.root={store}", "data.num_classes=4", "latent.kind=kl", "encoder.widths=[8,16]",
            "encoder.mae_batch=8", "encoder.mae_max_steps=4", "encoder.mae_minutes=0", "encoder.mae_patch=2",
            f"encoder.path={path}", *extra]


@pytest.mark.slow
def test_mae_encoder_pretraining_with_two_gloo_processes_reads_disjoint_shares_and_resumes(tmp_path):
    import torch

    from drift_policy.checkpoint import load_checkpoint
    from drift_policy.image.store import encode_folder

    src = make_fake_imagenet(tmp_path / "imagenet" / "train", classes=("n01", "n02", "n03", "n04"), per_class=4)
    store = tmp_path / "store"
    encode_folder(src, store, vae=make_tiny_vae(tmp_path / "vae"), size=16, shard_size=3, log=lambda *a: None)

    straight = tmp_path / "enc_straight.pt"
    log = _torchrun("encoder", *_mae_args(store, straight))
    check = json.loads(next(x for x in log.splitlines() if x.startswith("mae ddp check "))[len("mae ddp check "):])
    # 32 items (16 images + mirrors), 4 a step on each rank: after 4 steps each rank has read its 16 and the two
    # shares are disjoint, so together they covered the store once; DDP kept the replicas equal.
    assert check == {"world": 2, "param_max_diff": 0.0, "epoch0_items": [16, 16], "epoch0_overlap": 0}
    assert load_checkpoint(straight)["stats"]["steps"] == 4

    cut = tmp_path / "enc_cut.pt"
    log = _torchrun("encoder", *_mae_args(store, cut, "encoder.mae_launch_steps=2"))
    assert not cut.exists() and (tmp_path / "enc_cut.pt.resume" / "rank1.pt").exists() and "stopped at step 2" in log
    log = _torchrun("encoder", *_mae_args(store, cut))
    assert "resumed" in log and cut.exists() and not (tmp_path / "enc_cut.pt.resume").exists()
    a, b = load_checkpoint(straight)["encoder"], load_checkpoint(cut)["encoder"]
    assert all(torch.equal(a[k], b[k]) for k in a)                  # 2 + resume + 2 steps == 4 steps, bitwise
