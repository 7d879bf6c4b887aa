"""The scorer thread of ``Rollout`` (the GPU path, forced on the CPU with ``threaded=True``): it
gives the inline results, sleeps until there is work worth launching, and its failures reach the
collecting thread."""
import math
import threading

import pytest
import torch

from oppo_runtime.engine import SamplingParams
from oppo_runtime.engine.scorer import RuleReward
from test_rollout import make as make_rollout
from test_rollout import models  # noqa: F401  (the module-scoped fixture of tiny models)

LENS = [3, 40, 1, 17, 25, 9]


def make(models, threaded, chunk_size, num_pages=400, rule=None):
    ro, pool = make_rollout(models, True, chunk_size, num_pages, rule=rule, threaded=threaded)
    assert ro.threaded == threaded
    # no safety-net timeout: every round the worker needs must come from a wake-up (a lost one
    # hangs collect, caught by collect_in_thread), and the wake-up count is free of timing
    ro.WORKER_TIMEOUT_S = 1e3
    return ro, pool


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 80, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def collect_in_thread(ro, n=None, timeout=300):
    """collect() with a deadline: a hang fails the test instead of blocking the suite."""
    box = {}

    def target():
        try:
            box["out"] = ro.collect(n)
        except BaseException as e:  # noqa: BLE001
            box["err"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"collect({n}) hung for {timeout} s"
    if "err" in box:
        raise box["err"]
    return box["out"]


def rollout(models, threaded, chunk_size, lens, num_pages=400, splits=(None,), rule=None):
    ro, pool = make(models, threaded, chunk_size, num_pages, rule=rule)
    ro.submit(prompts(len(lens)), SamplingParams(temperature=1.0, max_new_tokens=128), target_lens=lens)
    out = []
    try:
        for n in splits:
            out += collect_in_thread(ro, n)
    finally:
        ro.close()
    assert pool.num_free == pool.num_pages, "pages leaked"
    pool.check()
    return sorted(out, key=lambda r: r.seq.sample_key), ro


@pytest.mark.parametrize("chunk_size,num_pages,splits", [(1, 400, (None,)), (4, 40, (3, None)),
                                                         (16, 400, (2, None)), (500, 400, (None,))])
def test_threaded_worker_equals_inline(models, chunk_size, num_pages, splits):
    rule = RuleReward(lambda prompt, response, text: float(len(response)))
    inline, _ = rollout(models, False, chunk_size, LENS, num_pages, splits, rule=rule)
    rule = RuleReward(lambda prompt, response, text: float(len(response)))
    threaded, ro = rollout(models, True, chunk_size, LENS, num_pages, splits, rule=rule)
    assert not ro._worker.is_alive(), "close() did not stop the scorer thread"
    assert len(inline) == len(threaded) == len(LENS)
    for a, b in zip(inline, threaded):
        assert a.error is None and b.error is None
        assert a.seq.output_ids == b.seq.output_ids
        assert len(b.values) == len(b.ref_logprobs) == len(b.seq.output_ids)
        torch.testing.assert_close(torch.tensor(b.values), torch.tensor(a.values), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.tensor(b.ref_logprobs), torch.tensor(a.ref_logprobs), atol=1e-5, rtol=1e-5)
        assert a.scores.keys() == b.scores.keys() == {"reward", "rule"}
        assert math.isclose(a.score, b.score, rel_tol=1e-5, abs_tol=1e-5)


def test_worker_sleeps_until_there_is_work(models):
    """With a large chunk size the scorers have nothing to launch until the sequences finish: the
    worker must not wake (take the GIL) at every actor step, let alone every fraction of one."""
    lens = [120, 90, 100, 60, 110, 80]
    ro, pool = make(models, True, 500)
    steps = 0
    step = ro.actor.step

    def counting_step():
        nonlocal steps
        steps += 1
        return step()

    ro.actor.step = counting_step
    worker_calls = 0
    score_some = ro._score_some

    def counting_score_some(*a, **k):
        nonlocal worker_calls
        if threading.current_thread() is ro._worker:
            worker_calls += 1
        return score_some(*a, **k)

    ro._score_some = counting_score_some
    ro.submit(prompts(len(lens), seed=3), SamplingParams(max_new_tokens=128), target_lens=lens)
    try:
        out = collect_in_thread(ro)
    finally:
        ro.close()
    assert all(r.error is None and len(r.values) == len(r.seq.output_ids) for r in out)
    assert pool.num_free == pool.num_pages
    assert steps >= max(lens)
    # the rounds: one at the start, one when the last sequence finishes, one for the flush (the old
    # polling worker took >700 rounds here); the calls of _score_some add the flush's launches
    # (the scorers' batches of 48 tokens)
    assert ro.worker_wakeups <= steps // 10, (ro.worker_wakeups, steps)
    assert worker_calls <= steps // 2, (worker_calls, steps)


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("chunk_size", [1, 500])
def test_scorer_failure_in_the_worker_reaches_collect(models, chunk_size):
    """chunk_size 1: the worker fails while the actor decodes; 500: while collect waits (flush)."""
    ro, pool = make(models, True, chunk_size)

    def fail(*a, **k):
        raise Boom("critic on fire")

    ro.scorers[1].step = fail
    ro.submit(prompts(len(LENS)), SamplingParams(max_new_tokens=64), target_lens=LENS)
    try:
        with pytest.raises(RuntimeError, match="scorer thread failed: Boom: critic on fire") as info:
            collect_in_thread(ro)
        assert isinstance(info.value.__cause__, Boom)
    finally:
        ro.close()
    assert not ro._worker.is_alive(), "close() did not stop the scorer thread"
