"""drift-policy bench latency (bench_latency.py, latency_report.py, timing.py) and the inference backends
(backends.py): structure, ratios, options, backend semantics.

No timings are asserted.
"""
import json

import numpy as np
import pytest
import torch

from drift_policy import backends, timing
from drift_policy import bench_latency as bl
from drift_policy import latency_report as report


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_bench_tiny_returns_documented_keys(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    res = bl.bench_latency(presets=["tiny"], batches=[1], repeats=2, warmup=1, budget_s=0.01, verbose=False,
                           backends=["eager", "reference", "jit_trace", "onnx_file"], backend_threads=[1],
                           backend_batches=[1, 2], profile=2)
    assert set(res) == {"meta", "results", "rows", "targets", "backends", "profile", "profile_reference",
                        "task_policies", "floor"}
    assert res["task_policies"] == []
    for k in ("cpu", "torch", "device", "threads_option", "torch_num_threads", "repeats_max", "budget_s"):
        assert k in res["meta"], k
    assert res["meta"]["torch_num_threads"] == 1 and res["meta"]["device"] == "cpu"

    assert len(res["results"]) == 3                          # 3 methods x 1 batch size
    for cell in res["results"]:
        assert set(bl.RESULT_KEYS) <= set(cell)
        assert cell["n_repeats"] == 2 and cell["median_ms"] > 0 and cell["p90_ms"] >= cell["min_ms"]
    assert {c["nfe"] for c in res["results"]} == {1, 10, 100}
    # the diffusion net has a timestep MLP and wider FiLM inputs: more parameters than the drift net
    drift = next(c for c in res["results"] if c["method"] == "drift")
    ddpm = next(c for c in res["results"] if c["method"] == "ddpm100")
    assert ddpm["params_m"] > drift["params_m"] > 0.5

    assert [(r["preset"], r["batch"]) for r in res["rows"]] == [("tiny", 1)]
    for r in res["rows"]:
        assert set(report.ROW_KEYS) <= set(r)
        assert r["ddpm100_over_drift"] == pytest.approx(r["ddpm100_ms"] / r["drift_ms"])
        assert r["ddim10_over_drift"] == pytest.approx(r["ddim10_ms"] / r["drift_ms"])
    assert "tiny" in res["targets"]["ratio_b1"]

    assert [(b["backend"], b["batch"]) for b in res["backends"]] == [
        (b, n) for b in ("eager", "reference", "jit_trace", "onnx_file") for n in (1, 2)]   # onnx_file: dynamic batch
    assert all(b["error"] is None and b["max_abs_diff"] < 1e-4 for b in res["backends"])
    floor = res["floor"]                                      # FLOPs / SGEMM rate of this run, per batch and threads
    assert floor["flops_per_call"]["2"] == 2 * floor["flops_per_call"]["1"] and floor["sgemm_gflops"]["1"] > 0
    net = bl._default_drift_policy("cpu", 0).model                # the weights every batch-1 call reads once, float32
    assert floor["weight_bytes"] == 4 * sum(p.numel() for p in net.parameters())
    assert set(floor["read_gbs"]) == {"memory", "cache"} and all(g > 0 for g in floor["read_gbs"].values())
    assert "Reading the net's weights once" in report.format_report(res)
    for b in res["backends"]:
        assert b["floor_ms"] == pytest.approx(floor["flops_per_call"][str(b["batch"])] / floor["sgemm_gflops"]["1"] / 1e6)
        assert b["over_floor"] == pytest.approx(b["median_ms"] / b["floor_ms"])
    default = res["targets"]["default_path_b1_by_threads"]["1"]       # the default path against the old eager path
    eager, ref = (next(b for b in res["backends"] if b["backend"] == k and b["batch"] == 1) for k in ("eager", "reference"))
    assert default["median_ms"] == eager["median_ms"] and default["reference_median_ms"] == ref["median_ms"]
    assert default["speedup_over_reference"] == pytest.approx(ref["median_ms"] / eager["median_ms"])
    assert res["profile"]["top_ops"] and res["profile"]["calls"] == 2 and res["profile"]["backend"] == "eager"
    ops = {o["op"] for o in res["profile_reference"]["top_ops"]}
    assert res["profile_reference"]["backend"] == "reference" and "aten::_slow_conv2d_forward" in ops

    js, md = report.write_results(res, tmp_path / "lat.json")
    assert json.loads(js.read_text())["rows"][0]["preset"] == "tiny"
    text = md.read_text()
    for col in ("preset", "params (M)", "batch", "drift 1-NFE ms", "DDIM-10 ms", "DDPM-100 ms", "DDPM-100/drift",
                "DDIM-10/drift", "threads 1", "torch " + torch.__version__, "vs reference", "| onnx_file | 1 | 2 |",
                "faster than the reference layers", "x floor", "Target: the default path (eager) <= 1 ms"):
        assert col in text, col


def test_ratios_and_rows():
    assert report.speed_ratio(250.0, 2.5) == pytest.approx(100.0)
    assert report.speed_ratio(None, 2.5) is None and report.speed_ratio(3.0, None) is None
    with pytest.raises(ValueError):
        report.speed_ratio(10.0, 0.0)
    cells = [{"preset": "small", "batch": 1, "method": m, "median_ms": ms, "p90_ms": ms * 1.1, "params_m": p}
             for m, ms, p in (("drift", 2.0, 4.0), ("ddim10", 25.0, 4.5), ("ddpm100", 230.0, 4.5))]
    cells.append({"preset": "small", "batch": 50, "method": "drift", "median_ms": 8.0, "p90_ms": 9.0,
                  "params_m": 4.0})
    rows = report.make_rows(cells)
    assert rows[0]["ddpm100_over_drift"] == pytest.approx(115.0)
    assert rows[0]["ddim10_over_drift"] == pytest.approx(12.5)
    assert rows[0]["params_m"] == 4.0 and rows[0]["params_m_diffusion"] == 4.5
    assert rows[1]["drift_ms"] == 8.0 and rows[1]["ddpm100_over_drift"] is None   # method not run: no ratio
    t = report.check_targets(rows)
    assert t["ratio_b1"]["small"] == {"ratio": pytest.approx(115.0), "met": True}
    assert t["default_drift_b1_met_eager"] is True                                   # 2.0 ms <= 3 ms


def test_time_call_repeats_and_stats():
    calls = []
    t = timing.time_call(lambda: calls.append(1), repeats=50, budget_s=1e-9, warmup=2)
    assert t["n_repeats"] == timing.MIN_REPEATS and t["n_warmup"] >= 1        # budget exhausted: the floor
    assert len(calls) == t["n_warmup"] + t["n_repeats"]
    t = timing.time_call(lambda: None, repeats=7, budget_s=10.0, warmup=1)
    assert t["n_repeats"] == 7                                           # capped by repeats
    import time as _time
    t = timing.time_call(lambda: _time.sleep(0.005), repeats=3, budget_s=10.0, warmup=1)
    assert t["median_ms"] >= 5.0 and t["cpu_median_ms"] < 2.0          # waiting is wall time, not CPU time
    vals = [5.0, 1.0, 3.0, 2.0, 4.0, 10.0]
    assert timing.percentile(vals, 90) == pytest.approx(np.percentile(vals, 90))
    assert timing.summarize_times(vals)["median_ms"] == pytest.approx(3.5)


@pytest.mark.parametrize("kw, match", [
    (dict(presets=["huge"]), "unknown backbone preset 'huge'"),
    (dict(methods=["ddpm50"]), "unknown method 'ddpm50'"),
    (dict(methods=[]), "methods must name"),
    (dict(batches=[0]), "batches must be integers >= 1"),
    (dict(threads=0), "threads must be >= 1"),
    (dict(repeats=0), "repeats must be >= 1"),
    (dict(budget_s=0), "budget_s must be > 0"),
    (dict(device="tpu"), "device must be 'cpu' or 'cuda"),
    (dict(backend="tensorrt"), "backend 'tensorrt' is not available on cpu"),
    (dict(backends=["cuda_graph"]), "backend 'cuda_graph' is not available on cpu"),
])
def test_bad_options_give_clear_errors(kw, match):
    with pytest.raises(bl.BenchOptionError, match=match):
        bl.bench_latency(**{"presets": ["tiny"], "verbose": False, **kw})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(bl.BenchOptionError, match="torch.cuda.is_available"):
        bl.bench_latency(presets=["tiny"], device="cuda", verbose=False)


@pytest.mark.parametrize("args, match", [
    (["presets=tiny", "colour=red"], "unknown option 'colour'"),
    (["batches=1,x"], "batches: expected a comma-separated list of int"),
    (["threads=two"], "bad option value"),
    (["presets=nope"], "unknown backbone preset 'nope'"),
    (["xlarge=maybe"], "expected a flag 0/1"),
])
def test_cli_bad_options(args, match):
    with pytest.raises(SystemExit, match=match):
        bl.main(args)


@pytest.mark.parametrize("method, backend", [("drift", "jit_trace"), ("drift", "reference"), ("ddim10", "reference"),
                                             ("drift", "onnxruntime"), ("ddim10", "onnxruntime"), ("drift", "fast_trace")])
def test_accelerated_policy_keeps_semantics(method, backend):
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnx")
    policy = bl.build_policy(method, "tiny")
    original_model = policy.model
    fast = backends.accelerated_policy(policy, backend, threads=1)
    assert policy.model is original_model                     # the original policy is untouched
    for batch in (1, 3):
        obs = bl.random_obs(policy, batch)
        assert backends.max_abs_diff(policy, fast, obs, seed=batch) < 1e-4
        out = fast.predict_action(obs)
        assert out["action"].shape == (batch, policy.config.n_action_steps, policy.config.action_dim)
    with pytest.raises(backends.BackendError, match="backend must be one of"):
        backends.accelerated_policy(policy, "tvm")


@pytest.mark.parametrize("c_in, c_out, k, stride, pad, bias", [(3, 8, 5, 1, 2, True), (8, 8, 3, 2, 1, True),
                                                                (6, 4, 1, 1, 0, True), (4, 6, 3, 1, 0, False)])
@pytest.mark.parametrize("batch", [1, 3])
def test_gemm_conv_matches_conv1d(c_in, c_out, k, stride, pad, bias, batch):
    from drift_policy.models.unet1d import conv1d_gemm

    conv = torch.nn.Conv1d(c_in, c_out, k, stride, pad, bias=bias)
    x = torch.randn(batch, c_in, 16)
    with torch.no_grad():
        torch.testing.assert_close(conv1d_gemm(x, conv), conv(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch, length", [(1, 4), (2, 8)])
def test_gemm_conv_transpose_matches_conv_transpose1d(batch, length):
    from drift_policy.models.unet1d import conv_transpose1d_gemm

    conv = torch.nn.ConvTranspose1d(6, 5, 4, 2, 1)
    x = torch.randn(batch, 6, length)
    with torch.no_grad():
        torch.testing.assert_close(conv_transpose1d_gemm(x, conv), conv(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="k=4, stride 2, padding 1"):
        conv_transpose1d_gemm(x, torch.nn.ConvTranspose1d(6, 5, 3, 2, 1))


def test_task_policies_time_the_image_encoder_separately():
    rows = bl.bench_task_policies(["pusht_keypoints/drift_unet", "pusht_image/drift_unet"], repeats=2, warmup=1,
                                  budget_s=0.01, say=lambda *a, **k: None)
    low, img = rows
    assert low["encoder_ms"] is None and low["nfe"] == 1
    assert img["encoder_params_m"] > 11.0                           # the full ResNet-18 trunk (11.2M) + head
    assert img["encoder_ms"] > 0 and img["predict_ms"] > 0          # both timed (no ordering: timings vary)
    assert img["params_m"] > low["params_m"] + img["encoder_params_m"] - 0.5
    with pytest.raises(bl.BenchOptionError):
        bl.bench_task_policies(["pusht/nonsense"], repeats=1, budget_s=0.01)
    assert "pusht_image/drift_unet" in report.format_report(
        {"meta": {**timing.machine_info("cpu"), "threads_option": 1, "torch_num_threads": 1, "backend": "eager",
                  "min_repeats": 2, "repeats_max": 2, "budget_s": 0.01},
         "rows": [], "targets": {}, "task_policies": rows})


def test_policy_flops_count_every_product_of_the_layers():
    """The floor's FLOPs (the gemm formulation under FlopCounterMode) against 2 x MACs of each layer, counted from
    the reference layers' own shapes."""
    from torch import nn

    policy = bl.build_policy("drift", "tiny")
    counted = []

    def hook(mod, inp, out):
        if isinstance(mod, nn.Conv1d):
            c_out, c_in, k = mod.weight.shape
            counted.append(2 * out.shape[0] * out.shape[2] * c_in * k * c_out)
        elif isinstance(mod, nn.ConvTranspose1d):
            c_in, c_out, k = mod.weight.shape
            counted.append(2 * inp[0].shape[0] * inp[0].shape[2] * c_in * c_out * k)
        elif isinstance(mod, nn.Linear):
            counted.append(2 * inp[0].shape[0] * mod.in_features * mod.out_features)

    handles = [m.register_forward_hook(hook) for m in policy.model.modules()]
    obs = bl.random_obs(policy, 3)
    with torch.no_grad():
        policy.model.reference_forward(torch.zeros(3, 16, 2), policy.condition(policy._obs(obs)))
    for h in handles:
        h.remove()
    assert bl.policy_flops(policy, 3) == sum(counted)
