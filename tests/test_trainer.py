"""The PPO trainer on the embedded default task (CPU): learning, schedule-invariance, deferral
conservation, kill -9 and resume, bad input."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from oppo_runtime.ppo.config import ConfigError, load_config
from oppo_runtime.ppo.trainer import PPOTrainer

CACHE = str(Path(__file__).resolve().parent.parent / ".oppo_cache")
SKIP = ("timing_s/", "perf/", "wall_time", "oppo/hidden_fraction")


def cfg(tmp, overlap, steps, *extra):
    return load_config(None, [f"run.out_dir={tmp}", f"run.overlap={overlap}", f"run.total_steps={steps}",
                              f"run.cache_dir={CACHE}", "run.progress=false", "run.tensorboard=false",
                              "run.timeline_every=1000", *extra])


def metrics(path):
    return [json.loads(l) for l in open(Path(path) / "metrics.jsonl")]


def assert_same_metrics(a, b, tol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k, v in x.items():
            if k.startswith(SKIP) or v is None:
                continue
            assert abs(v - y[k]) <= tol * max(1.0, abs(v)), f"step {x['step']} {k}: {v} vs {y[k]}"


def mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.slow
@pytest.mark.parametrize("overlap", ["none", "intra", "full"])
def test_default_run_learns(tmp_path, overlap):
    PPOTrainer(cfg(tmp_path, overlap, 100)).train()
    rewards = [m["objective/scores"] for m in metrics(tmp_path)]
    first, last = mean(rewards[:10]), mean(rewards[-10:])
    print(f"{overlap}: mean reward of the first 10 steps {first:.3f}, last 10 {last:.3f}")
    assert last > first + 0.2, (first, last)
    assert (tmp_path / "reward_curve.png").stat().st_size > 0


def test_intra_overlap_changes_nothing_but_the_schedule(tmp_path):
    # float64: the scorers' chunked prefill rounds differently from a whole-sequence prefill, and
    # training amplifies float32 rounding; in float64 both schedules agree to ~1e-14
    PPOTrainer(cfg(tmp_path / "none", "none", 12, "model.dtype=float64")).train()
    PPOTrainer(cfg(tmp_path / "intra", "intra", 12, "model.dtype=float64")).train()
    assert_same_metrics(metrics(tmp_path / "none"), metrics(tmp_path / "intra"))


def test_full_with_delta_zero_equals_intra(tmp_path):
    zero = ["rollout.delta_init=0", "rollout.delta_min=0", "rollout.delta_max=0"]
    PPOTrainer(cfg(tmp_path / "intra", "intra", 8, "model.dtype=float64")).train()
    PPOTrainer(cfg(tmp_path / "full", "full", 8, "model.dtype=float64", *zero)).train()
    assert_same_metrics(metrics(tmp_path / "intra"), metrics(tmp_path / "full"), tol=1e-12)


@pytest.mark.parametrize("decode", ["sync", "async"])
def test_deferral_conserves_prompts_and_trains_exactly_b(tmp_path, decode, monkeypatch):
    # async: the GPU's decode (tokens read one step late; its lagged steps from the last step's
    # arrays) through deferral, the staleness bound and weight syncs
    monkeypatch.setenv("OPPO_ASYNC_DECODE", "1" if decode == "async" else "0")
    t = PPOTrainer(cfg(tmp_path, "full", 12, "rollout.delta_init=6", "rollout.delta_max=8", "rollout.staleness_limit=2"))
    t.train()
    assert (t.engine.scheduler.rows_stats["fast"] > 0) == (decode == "async")
    ms = metrics(tmp_path)
    assert all(m["oppo/trained_sequences"] == t.cfg.rollout.batch_size for m in ms)
    assert sum(m["oppo/num_deferred"] > 0 for m in ms) >= 6, "deferral never happened"
    assert max(m["oppo/staleness_max"] for m in ms) <= 2
    assert len(t.trained_keys) == len(set(t.trained_keys)), "a sequence was trained twice"
    in_flight = {s.sample_key for s in t.rollout.in_flight.values()}
    assert set(t.trained_keys) | in_flight == set(range(t.next_prompt)), "a prompt was lost"
    assert not set(t.trained_keys) & in_flight


def _run_cli(out, *args):
    return subprocess.Popen([sys.executable, "-m", "oppo_runtime.cli", "train", "--out", str(out),
                             f"run.cache_dir={CACHE}", "run.progress=false", "run.tensorboard=false",
                             "model.dtype=float64", "run.save_every=3", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("overlap,extra", [("intra", ()), ("full", ()), ("full", ("run.scorer_device=cpu",))],
                         ids=["intra", "full", "full-scorers-placed-apart"])
def test_kill_9_and_resume_equals_an_uninterrupted_run(tmp_path, overlap, extra):
    ref = _run_cli(tmp_path / "ref", *extra, "--steps", "10", "--overlap", overlap)
    assert ref.wait(timeout=600) == 0, ref.stdout.read()
    run = _run_cli(tmp_path / "run", *extra, "--steps", "10", "--overlap", overlap)
    ck = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 300
    while not (ck / "step-000006").exists() and time.time() < deadline and run.poll() is None:
        time.sleep(0.05)
    assert run.poll() is None, "the run ended before it could be killed"
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    done = sorted(p.name for p in ck.glob("step-*") if not p.name.endswith(".tmp"))
    assert done and int(done[-1][5:]) < 10
    res = _run_cli(tmp_path / "run", *extra, "--resume", "--steps", "10", "--overlap", overlap)
    out = res.communicate(timeout=600)[0]
    assert res.returncode == 0, out
    assert_same_metrics(metrics(tmp_path / "ref"), metrics(tmp_path / "run"))
    # conservation across the kill: every admitted prompt trained once or still in flight
    ref_state = json.loads((tmp_path / "ref" / "checkpoints" / "step-000010" / "state.json").read_text())
    state = json.loads((ck / "step-000010" / "state.json").read_text())
    keys = state["trained_keys"]
    assert keys == ref_state["trained_keys"] and len(keys) == len(set(keys))
    in_flight = {d["sample_key"] for d in state["in_flight"]}
    assert set(keys) | in_flight == set(range(state["next_prompt"])) and not set(keys) & in_flight


def test_invalid_config_values_name_the_value():
    with pytest.raises(ConfigError, match=r"ppo.gamma = 1.5"):
        load_config(None, ["ppo.gamma=1.5"])
    with pytest.raises(ConfigError, match=r"run.overlap"):
        load_config(None, ["run.overlap=sideways"])
    with pytest.raises(ConfigError, match=r"run.scorer_device = 'gpu1'"):
        load_config(None, ["run.scorer_device=gpu1"])
    with pytest.raises(ConfigError, match=r"unknown config keys in \[rollout\]: \['batch'\]"):
        load_config(None, ["rollout.batch=3"])
    out = subprocess.run([sys.executable, "-m", "oppo_runtime.cli", "train", "rollout.batch_size=0"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "rollout.batch_size = 0" in out.stderr
    # overrides between options are overrides too (argparse alone took only the first run of them)
    out = subprocess.run([sys.executable, "-m", "oppo_runtime.cli", "train", "--overlap", "none", "run.seed=1",
                          "--steps", "1", "rollout.batch_size=0"], capture_output=True, text=True)
    assert out.returncode == 2 and "rollout.batch_size = 0" in out.stderr, out.stderr


def test_nan_reward_is_an_error_naming_the_sequence_or_a_counted_skip(tmp_path, monkeypatch):
    import oppo_runtime.ppo.trainer as tr

    calls = {"n": 0}

    def bad_reward(p, r, text):
        calls["n"] += 1
        return float("nan") if calls["n"] == 5 else 0.5

    monkeypatch.setattr(tr, "case_reward", bad_reward)
    t = PPOTrainer(cfg(tmp_path / "err", "intra", 3))
    with pytest.raises(FloatingPointError, match=r"invalid scores.*sequence \d+"):
        t.train()
    calls["n"] = 0
    t = PPOTrainer(cfg(tmp_path / "skip", "intra", 3, "run.nan_policy=skip"))
    t.train()
    assert metrics(tmp_path / "skip")[-1]["oppo/skipped_sequences"] == 1


def test_prompt_file_with_a_too_long_prompt_names_its_line_or_is_a_counted_skip(tmp_path):
    from oppo_runtime.ppo.default_task import VOCAB
    lines = [json.dumps({"prompt": "abc:"}), json.dumps({"prompt": "ABCD:", "target_len": 5}),
             json.dumps({"prompt_ids": [2] + [3] * 40})] + [json.dumps({"prompt": w + ":"}) for w in
                                                            ("xy", "QR", "mn", "ST", "uv", "WXY")] * 3
    f = tmp_path / "prompts.jsonl"
    f.write_text("\n".join(lines) + "\n")
    extra = [f"rollout.prompt_file={f}", "rollout.max_prompt_len=16", "rollout.batch_size=8"]
    with pytest.raises(ValueError, match=r"prompts.jsonl:3: prompt of 41 tokens is longer than rollout.max_prompt_len=16"):
        PPOTrainer(cfg(tmp_path / "a", "intra", 2, *extra))
    t = PPOTrainer(cfg(tmp_path / "b", "intra", 2, *extra, "run.nan_policy=skip"))
    t.train()
    assert t.skipped == 1 and len(t.prompts) == len(lines) - 1
    assert metrics(tmp_path / "b")[-1]["oppo/skipped_sequences"] == 1
    assert len(VOCAB) == t.actor.config.vocab_size


def test_releasing_the_pool_for_training_changes_nothing(tmp_path):
    common = ["model.dtype=float64", "rollout.delta_init=4"]
    PPOTrainer(cfg(tmp_path / "keep", "full", 6, *common)).train()
    PPOTrainer(cfg(tmp_path / "release", "full", 6, *common, "rollout.release_pool_in_training=true")).train()
    assert_same_metrics(metrics(tmp_path / "keep"), metrics(tmp_path / "release"), tol=1e-12)


def test_scorers_placed_apart_with_a_pool_of_their_own_change_nothing(tmp_path):
    """run.scorer_device (another GPU in production; here the CPU again): the scorers get their own
    page pool and an inference copy of the critic, synced after every update; the run is the same."""
    common = ["model.dtype=float64", "rollout.delta_init=4"]
    PPOTrainer(cfg(tmp_path / "beside", "full", 6, *common)).train()
    tr = PPOTrainer(cfg(tmp_path / "apart", "full", 6, *common, "run.scorer_device=cpu"))
    assert tr.scorer_pool is not tr.pool and tr.engine_critic is not tr.critic
    assert set(tr.pool.views) == {"actor"} and set(tr.scorer_pool.views) == {"reward", "critic", "ref"}
    tr.train()
    assert_same_metrics(metrics(tmp_path / "beside"), metrics(tmp_path / "apart"), tol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_scorers_on_a_second_gpu_train_like_scorers_beside_the_actor(tmp_path):
    common = ["run.device=cuda:0", "rollout.delta_init=4"]
    PPOTrainer(cfg(tmp_path / "beside", "full", 3, *common)).train()
    PPOTrainer(cfg(tmp_path / "apart", "full", 3, *common, "run.scorer_device=cuda:1")).train()
    a, b = metrics(tmp_path / "beside"), metrics(tmp_path / "apart")
    assert all("memory/scorer_max_allocated_gib" in m for m in b)
    # bf16 engines on two GPUs: the same tokens need not come out, so compare what must hold
    assert [m["oppo/trained_sequences"] for m in a] == [m["oppo/trained_sequences"] for m in b]
    assert all(math.isfinite(m["objective/scores"]) and math.isfinite(m["loss/value_avg"]) for m in b)


def test_update_phases_are_timed_in_metrics_and_timeline(tmp_path):
    """The update's phases (old log-probs, actor, critic, optimizer) are spans of the step's
    "update" lane, inside the train span, and their seconds are metrics."""
    t = PPOTrainer(cfg(tmp_path, "intra", 2, "ppo.micro_batch_size=2"))
    t.train()
    m = metrics(tmp_path)[-1]
    phases = {k: v for k, v in m.items() if k.startswith("timing_s/update_")}
    assert set(phases) == {f"timing_s/update_{p}" for p in ("old_logprob", "actor", "critic", "optimizer")}
    assert all(v > 0 for v in phases.values())
    tl = t.last_timeline
    (train,) = [s for s in tl.spans if s.lane == "train"]
    upd = [s for s in tl.spans if s.lane == "update"]
    assert len([s for s in upd if s.args["phase"] == "actor"]) >= 2       # one span per micro-batch
    assert all(train.start_s <= s.start_s and s.end_s <= train.end_s + 1e-6 for s in upd)
    assert sum(phases.values()) <= m["timing_s/train"] + 1e-6


def test_micro_batches_group_by_length_and_bound_tokens():
    from oppo_runtime.ppo.trainer import micro_batches
    import random
    rng = random.Random(0)
    toks = [rng.choice([20, 40, 80, 4000]) for _ in range(64)]
    idx = list(range(0, 64, 2))
    parts = micro_batches(idx, toks, 8)
    assert sorted(i for p in parts for i in p) == sorted(idx)          # each sequence exactly once
    budget = 8 * sum(toks[i] for i in idx) / len(idx)
    for p in parts:
        assert len(p) <= 8
        assert len(p) == 1 or sum(toks[i] for i in p) <= budget
    flat = [toks[i] for p in parts for i in p]
    assert flat == sorted(flat)                                       # similar lengths together
    assert micro_batches([], toks, 8) == []


def test_micro_batches_token_budget_packs_whole_sequences_up_to_it():
    from oppo_runtime.ppo.trainer import micro_batches
    toks = [100, 900, 300, 5000, 250, 700, 60, 1200]
    idx = list(range(len(toks)))
    parts = micro_batches(idx, toks, 2, max_tokens=2000)      # size is ignored under a token budget
    assert sorted(i for p in parts for i in p) == idx
    for p in parts:
        assert len(p) == 1 or sum(toks[i] for i in p) <= 2000
    assert [3] in parts                                       # longer than the budget: alone
    assert parts == [[6, 0, 4, 2, 5], [1], [7], [3]]
    flat = [toks[i] for p in parts for i in p]
    assert flat == sorted(flat)


def test_pad_scatters_rows_and_passes_gradients():
    from oppo_runtime.ppo.trainer import PPOTrainer
    tr = PPOTrainer.__new__(PPOTrainer)
    tr.device = torch.device("cpu")
    flat = torch.arange(1.0, 7.0, requires_grad=True)
    out = tr._pad(flat, [2, 0, 3, 1])
    assert out.tolist() == [[1, 2, 0], [0, 0, 0], [3, 4, 5], [6, 0, 0]]
    (out * torch.arange(12.0).view(4, 3)).sum().backward()
    assert flat.grad.tolist() == [0, 1, 6, 7, 8, 9]
