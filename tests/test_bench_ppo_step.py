"""bench/ppo_step.py (full PPO steps, four overlap modes, TRL beside them) on tiny models on the
CPU, so that the GPU benchmark cannot rot: every mode runs the real trainer, TRL's trainer runs
in its subprocess, the JSON carries the summary keys of issue 10 and the two timelines exist."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def _load(name):
    return load_script(BENCH, name)


def _has_trl():
    return importlib.util.find_spec("trl") is not None and importlib.util.find_spec("datasets") is not None


def test_tiny_run_of_every_mode_and_trl(tmp_path):
    trl = _has_trl()
    out = tmp_path / "res" / "ppo_step.json"
    cmd = [sys.executable, str(BENCH / "ppo_step.py"), "--tiny", "--workload", "T", "--steps", "1", "--warmup", "1",
           "--out", str(out), "--cache-dir", str(tmp_path / "models"), *(["--trl"] if trl else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    d = json.loads(out.read_text())
    rows = {r["mode"]: r for r in d["workloads"]["T"]["rows"]}
    assert set(rows) == {"none", "intra", "inter", "full"} | ({"trl"} if trl else set())
    for m, r in rows.items():
        assert not r.get("error"), (m, r.get("error"))
        assert r["step_s"] > 0 and r["gen_tok_s"] > 0 and r["steps_timed"] == 1, (m, r)
        assert r["train_s"] > 0 and r["rollout_s"] > 0 and r["exposed_score_s"] >= 0, (m, r)
        assert r["busy"] is None                       # no GPU: no NVML
    for m in ("none", "intra", "inter", "full"):
        r = rows[m]
        assert r["stale_finished"] == 0
        assert all(s["trained_tokens"] > 0 for s in r["steps"])
    assert rows["none"]["deferred_mean"] == 0 and rows["full"]["deferred_mean"] > 0
    s = d["summary"]
    for key in ("speedup_full_vs_none", "busy_ratio_full_vs_none", "speedup_full_vs_trl", "speedup_none_vs_trl",
                "speedup_full_vs_none_T"):
        assert key in s
    assert s["speedup_full_vs_none_T"] > 0
    if trl:
        assert math.isfinite(s["speedup_full_vs_trl"]) and math.isfinite(s["speedup_none_vs_trl"])
        assert rows["trl"]["generated_tokens_per_step"] == 8 * 16     # B x response_length, no stop token
    for m in ("none", "full"):
        png = out.parent / f"ppo_step_T_{m}_timeline.png"
        assert png.stat().st_size > 1000, png
    assert "workload T" in run.stdout and "summary:" in run.stdout


def test_summary_and_merge_of_workloads(tmp_path):
    ps = _load("ppo_step")
    row = lambda m, s, busy=None: {"mode": m, "step_s": s, "busy": busy, "gen_tok_s": 100.0 / s}  # noqa: E731
    g = {"config": {}, "rows": [row("none", 20.0, 0.5), row("full", 10.0, 0.8)]}
    t = {"config": {}, "rows": [row("none", 4.0), row("full", 2.0), row("trl", 16.0)]}
    ps.save(tmp_path / "a" / "ppo_step.json", {"card": "x"}, {"G": g})
    ps.save(tmp_path / "b" / "ppo_step.json", {"card": "x"}, {"T": t})
    (tmp_path / "b" / "ppo_step_T_full_timeline.png").write_bytes(b"png")
    out = tmp_path / "c" / "ppo_step.json"
    ps.main(["--merge", str(tmp_path / "a" / "ppo_step.json"), str(tmp_path / "b" / "ppo_step.json"),
             "--out", str(out)])
    s = json.loads(out.read_text())["summary"]
    assert s["speedup_full_vs_none"] == pytest.approx(2.0)
    assert s["busy_ratio_full_vs_none"] == pytest.approx(1.6)     # no GPM: NVML utilization
    assert s["busy_ratio_full_vs_none_source"] == "nvml utilization"
    assert s["kernel_active_ratio_full_vs_none"] == pytest.approx(1.6)
    assert s["speedup_full_vs_trl"] == pytest.approx(8.0)
    assert s["speedup_none_vs_trl"] == pytest.approx(4.0)
    assert s["speedup_full_vs_none_T"] == pytest.approx(2.0)
    assert (out.parent / "ppo_step_T_full_timeline.png").exists()
    # a later run of one workload keeps the others already in the file
    ps.save(out, {"card": "x"}, {"T": {"config": {}, "rows": [row("none", 4.0), row("full", 1.0), row("trl", 16.0)]}})
    s = json.loads(out.read_text())["summary"]
    assert s["speedup_full_vs_none"] == pytest.approx(2.0) and s["speedup_full_vs_trl"] == pytest.approx(16.0)


def test_busy_ratio_is_sm_busy_where_gpm_is_there():
    """NVML utilization counts a 1-SM kernel as busy; with GPM both ways are kept and the headline
    ratio is SM busy."""
    ps = _load("ppo_step")
    rows = [{"mode": "none", "step_s": 6.0, "busy": 0.9, "sm_busy": 0.4},
            {"mode": "full", "step_s": 2.5, "busy": 0.8, "sm_busy": 0.7}]
    s = ps.summarize({"G": {"config": {}, "rows": rows}})
    assert s["busy_ratio_full_vs_none"] == pytest.approx(0.7 / 0.4)
    assert s["busy_ratio_full_vs_none_source"] == "nvml-gpm SM_UTIL"
    assert s["kernel_active_ratio_full_vs_none"] == pytest.approx(0.8 / 0.9)
    rows[0]["sm_busy"] = None                       # one mode without GPM: no mixed ratio
    s = ps.summarize({"G": {"config": {}, "rows": rows}})
    assert s["busy_ratio_full_vs_none"] == pytest.approx(0.8 / 0.9)
    assert s["busy_ratio_full_vs_none_source"] == "nvml utilization"


def test_trl_baseline_config_builds_without_running(tmp_path):
    """TRL's trainer on the bench's model directories: batch = micro x accumulation, one mini-batch,
    no stop token (generation runs response_length tokens)."""
    if not _has_trl():
        pytest.skip("trl not installed")
    ps = _load("ppo_step")
    trl_step = _load("trl_ppo_step")
    paths = ps.ensure_models(tmp_path / "models", "tiny", 128, 256)
    pf = ps.write_prompts(tmp_path / "p.jsonl", 32, 16, 128, 5, 1.0, 16)
    args = trl_step.argparse.Namespace(actor=paths["actor"], reward=paths["reward"], critic=paths["critic"],
                                       prompts=str(pf), batch=8, micro=4, response_length=16, steps=1, warmup=1,
                                       dtype="bf16", lr=1e-6, device="cpu", out=str(tmp_path / "t.json"))
    trainer, timer = trl_step.build(args)
    timer.unwrap()                                  # TRL's module functions as they were
    a = trainer.args
    assert a.batch_size == 8 and a.local_mini_batch_size == 8 and a.num_ppo_epochs == 1
    assert a.response_length == 16 and trainer.stop_token_id is None
    assert a.num_total_batches == 2


def test_profile_writes_stage_labelled_tables(tmp_path):
    out = tmp_path / "res" / "ppo_step.json"
    cmd = [sys.executable, str(BENCH / "ppo_step.py"), "--tiny", "--workload", "T", "--modes", "none", "--steps", "1",
           "--warmup", "0", "--profile", "--out", str(out), "--cache-dir", str(tmp_path / "models")]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         timeout=240, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = (out.parent / "ppo_step_T_none_profile.txt").read_text()
    assert "stage/rollout" in text and "stage/train" in text
    # the gzipped trace holds the update's phase ranges that bench/trace_phases.py sums by
    events = _load("trace_phases").load(str(out.parent / "ppo_step_T_none_trace.json.gz"))
    names = {e.get("name") for e in events if e.get("cat") == "user_annotation"}
    assert {"update/old_logprob", "update/actor", "update/critic", "update/optimizer"} <= names


def test_trace_phases_gives_each_kernel_to_the_range_that_launched_it():
    tp = _load("trace_phases")

    def x(cat, name, ts, dur, tid=1, **args):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid, "args": args}
    ev = [x("user_annotation", "update/actor", 100, 50), x("user_annotation", "update/critic", 200, 50),
          x("cuda_runtime", "cudaLaunchKernel", 110, 1, correlation=1),
          x("cuda_runtime", "cudaLaunchKernel", 120, 1, correlation=2),
          x("cuda_runtime", "cudaLaunchKernel", 210, 1, correlation=3),
          x("cuda_runtime", "cudaLaunchKernel", 170, 1, correlation=4),          # between the ranges
          x("cuda_runtime", "cudaLaunchKernel", 130, 1, tid=2, correlation=5),   # backward's thread
          x("cuda_runtime", "cudaLaunchKernel", 180, 1, tid=2, correlation=6),   # a scorer's thread
          x("kernel", "gemm", 300, 10, tid=7, correlation=1), x("kernel", "gemm", 305, 10, tid=7, correlation=2),
          x("kernel", "norm", 400, 4, tid=7, correlation=3), x("kernel", "other", 500, 2, tid=7, correlation=4),
          x("kernel", "gemm_bwd", 600, 3, tid=8, correlation=5), x("kernel", "scorer", 700, 1, tid=8, correlation=6)]
    res = tp.phases(ev)
    assert set(res) == {"actor", "critic", "-"}
    a = res["actor"]
    assert (a["count"], a["kernel_us"], a["busy_us"], a["span_us"]) == (3, 23, 18, 303)
    assert a["top"] == [("gemm", 20.0, 2), ("gemm_bwd", 3.0, 1)]
    assert res["critic"]["kernel_us"] == 4 and res["-"]["count"] == 2 and res["-"]["kernel_us"] == 3
    assert "| actor | 3 |" in tp.report(res)
    # the rollout's ranges (engine/ on the actor thread, scorer/ on the worker): own thread only
    ev2 = [x("user_annotation", "engine/decode", 100, 50), x("user_annotation", "scorer/reward", 105, 80, tid=2),
           x("cuda_runtime", "cudaGraphLaunch", 110, 1, correlation=1),
           x("cuda_runtime", "cudaLaunchKernel", 160, 1, correlation=2),            # actor, between steps
           x("cuda_runtime", "cudaLaunchKernel", 120, 1, tid=2, correlation=3),
           x("kernel", "decode_attn", 300, 10, tid=7, correlation=1), x("kernel", "copy", 320, 1, tid=7, correlation=2),
           x("kernel", "prefill_attn", 330, 20, tid=8, correlation=3)]
    res2 = tp.phases(ev2, ("engine/", "scorer/"), any_thread=False)
    assert set(res2) == {"engine/decode", "scorer/reward", "-"}
    assert res2["-"]["top"] == [("copy", 1.0, 1)] and res2["scorer/reward"]["kernel_us"] == 20


def test_gpm_sm_utilization_reader_pairs_consecutive_samples():
    """The NVML GPM reader (no GPU here: a fake nvml module with the same API) asks for SM_UTIL,
    SM_OCCUPANCY and ANY_TENSOR_UTIL between the previous sample and the new one, alternating two
    sample buffers; a metric the driver refuses is None, the others go on."""
    from types import SimpleNamespace
    ppo = _load("ppo_step")
    calls = []

    class Metrics:
        def __init__(self):
            self.metrics = [SimpleNamespace(metricId=None, value=None, nvmlReturn=None) for _ in range(4)]

    def get(mg):
        calls.append((mg.sample1.n, mg.sample2.n, [mg.metrics[j].metricId for j in range(mg.numMetrics)]))
        for j in range(mg.numMetrics):
            m = mg.metrics[j]
            m.value, m.nvmlReturn = 10.0 * len(calls) + j, (3 if m.metricId == 5 else 0)   # no tensor metric

    nv = SimpleNamespace(NVML_GPM_METRICS_GET_VERSION=1, NVML_GPM_METRIC_SM_UTIL=2,   # no OCCUPANCY name:
                         nvmlGpmQueryDeviceSupport=lambda h: SimpleNamespace(isSupportedDevice=1),   # its id
                         nvmlGpmSampleAlloc=lambda: SimpleNamespace(n=0),
                         nvmlGpmSampleGet=lambda h, s: setattr(s, "n", s.n + 1),
                         c_nvmlGpmMetricsGet_t=Metrics, nvmlGpmMetricsGet=get)
    sampler = ppo.BusySampler.__new__(ppo.BusySampler)
    sampler.sm_samples, sampler.sm_source = [], None
    read = sampler._gpm_reader(nv, handle=0)
    assert sampler.sm_source and read is not None and len(calls) == 1
    t1, v1 = read()
    t2, v2 = read()
    assert v1 == {"sm": 20.0, "occupancy": 21.0, "tensor": None} and v2["sm"] == 30.0 and t2 >= t1
    # buffers alternate: each call's sample1 is the previous call's sample2; the three metric ids
    assert [c[2] for c in calls] == [[2, 3, 5]] * 3
    assert calls[1][0] == calls[0][1] and calls[2][0] == calls[1][1]
    sampler.sm_samples = [(1.0, {"sm": 50.0, "occupancy": 20.0, "tensor": None}),
                          (2.0, {"sm": 10.0, "occupancy": 40.0, "tensor": 8.0}),
                          (5.0, {"sm": 90.0, "occupancy": 90.0, "tensor": 90.0})]
    assert sampler.gpm_mean([(0.5, 2.5)]) == pytest.approx(0.3)
    assert sampler.gpm_mean([(0.5, 2.5)], "occupancy") == pytest.approx(0.3)
    assert sampler.gpm_mean([(0.5, 2.5)], "tensor") == pytest.approx(0.08)      # the None left out
    unsupported = SimpleNamespace(nvmlGpmQueryDeviceSupport=lambda h: SimpleNamespace(isSupportedDevice=0))
    assert sampler._gpm_reader(unsupported, handle=0) is None
