"""The chunk-size cost model and its online trial (ppo/controllers.py)."""
import json
import math

import pytest

from oppo_runtime.ppo.config import ConfigError, load_config
from oppo_runtime.ppo.controllers import ChunkSizeController


def calls(o, p, sizes=(64, 256, 1024, 4096)):
    return [(n, o + p * n) for n in sizes]


def test_fit_recovers_overhead_and_per_token_cost():
    o, p = ChunkSizeController.fit(calls(0.007, 2e-6))
    assert abs(o - 0.007) < 1e-9 and abs(p - 2e-6) < 1e-12


def test_cheap_calls_stream_in_small_chunks():
    c = ChunkSizeController(16, max_interference=0.05)
    # 50 us per call, 2 ms decode steps, 1 scorer: keeping up and interference both allow C=1
    assert c.update(2.0, 1000, 64, calls(5e-5, 1e-9)) == 1


def test_call_overhead_sets_a_floor_from_interference():
    c = ChunkSizeController(16, max_interference=0.05)
    # 7 ms per call, 2 ms decode steps, 3 scorers: n*o/(0.05*d) = 210 -> 256 (keeping up alone: ~4)
    assert c.update(2.0, 1000, 64, calls(0.007, 1e-8), num_scorers=3) == 256
    assert c.last_model["chunk_size"] == 256
    # without the interference term (huge tolerance) the keep-up bound alone picks a small C
    loose = ChunkSizeController(16, max_interference=1e9)
    assert loose.update(2.0, 1000, 64, calls(0.007, 1e-8), num_scorers=3) == 4


def test_scorers_slower_than_decode_fall_back_to_the_largest_chunk():
    c = ChunkSizeController(16, c_max=1024)
    assert c.update(1.0, 1000, 64, calls(1e-4, 1e-3)) == 1024     # p*b = 64 ms > d = 1 ms


def test_not_adaptive_or_without_data_keeps_c():
    assert ChunkSizeController(32, adaptive=False).update(1.0, 10, 8, calls(0.01, 1e-6)) == 32
    assert ChunkSizeController(32).update(1.0, 0, 8, calls(0.01, 1e-6)) == 32
    assert ChunkSizeController(32).update(1.0, 10, 8, calls(0.01, 1e-6)[:1]) == 32


# ---------------------------------------------------------------- the online trial of C
def seconds_per_step(c, best=256):
    """Synthetic rollout seconds per actor step: convex in log2(C), fastest at ``best``."""
    return 1e-3 * (1 + 0.1 * (math.log2(c) - math.log2(best)) ** 2)


def run(ctl, steps, model_calls, rollout=True, best=256, steps_per_rollout=1000, end_round=False):
    """Feed ``steps`` steps to ``ctl`` (and more to finish a round under way, with ``end_round``);
    the C each step ran with and where it came from."""
    seen = []
    while len(seen) < steps or (end_round and ctl.round is not None):
        c = ctl.chunk_size
        seen.append((c, ctl.source))
        rollout_s = seconds_per_step(c, best) * steps_per_rollout if rollout else None
        ctl.update(2.0, steps_per_rollout, 64, model_calls, rollout_s=rollout_s)
    return seen


SAYS_64 = calls(0.006, 1e-8)      # 2 ms decode steps, 1 scorer: 0.006 / (0.05 * 2 ms) = 60 -> 64
SAYS_256 = calls(0.02, 1e-8)      # 0.02 / (0.05 * 2 ms) = 200 -> 256


def test_the_synthetic_model_picks():
    assert ChunkSizeController(16).update(2.0, 1000, 64, SAYS_64) == 64
    assert ChunkSizeController(16).update(2.0, 1000, 64, SAYS_256) == 256


def test_trial_overrules_a_wrong_model_and_pins_the_optimum():
    ctl = ChunkSizeController(16, trial_every=4)
    seen = run(ctl, 60, SAYS_64, end_round=True)
    assert seen[1] == (64, "model")
    assert ("trial" in {s for _, s in seen}) and {128, 32} <= {c for c, _ in seen}
    assert (ctl.chunk_size, ctl.source) == (256, "pinned")
    assert ctl.metrics() == {"oppo/chunk_size": 256, "oppo/chunk_trial": 0, "oppo/chunk_pinned": 1}
    # every later round keeps 256: C outside the rounds ends at 256 and stays there
    held = [c for c, s in seen[30:] if s == "pinned"]
    assert held and set(held) == {256}
    assert ctl.last_round["winner"] == 256 and ctl.last_round["seconds_per_step"][64] > 1.05e-3


def test_a_right_model_stays_in_charge():
    ctl = ChunkSizeController(16, trial_every=4)
    seen = run(ctl, 60, SAYS_256, end_round=True)
    assert "pinned" not in {s for _, s in seen} and "trial" in {s for _, s in seen}
    assert {c for c, s in seen if s == "model"} == {256}
    assert (ctl.chunk_size, ctl.source) == (256, "model")
    assert ctl.last_round["source"] == "model"


def test_a_model_within_the_margin_stays_in_charge():
    # optimum at 181 (between 128 and 256): 256 is 1.3% slower than 128... within 5%, the model keeps it
    ctl = ChunkSizeController(16, trial_every=4)
    seen = run(ctl, 40, SAYS_256, best=181)
    assert "pinned" not in {s for _, s in seen}
    strict = ChunkSizeController(16, trial_every=4, trial_margin=0.0)
    run(strict, 40, SAYS_256, best=150, end_round=True)     # 128 is faster than 256 here: the model is overruled
    assert (strict.chunk_size, strict.source) == (128, "pinned")


def test_without_a_model_the_trial_walks_c_to_the_optimum():
    ctl = ChunkSizeController(8, trial_every=2)
    seen = run(ctl, 80, [], end_round=True)
    assert seen[0] == (8, "fixed") and seen[1] == (8, "fixed")
    held = [c for c, s in seen if s != "trial"]
    assert held == sorted(held) and held[-1] == 256         # one power of two per round, never back
    assert set(held) >= {16, 32, 64, 128, 256}
    assert (ctl.chunk_size, ctl.source) == (256, "pinned")


def test_no_trial_when_disabled_or_unmeasured():
    for ctl, rollout in ((ChunkSizeController(16, trial_every=0), True), (ChunkSizeController(16, trial_every=1), False)):
        seen = run(ctl, 30, SAYS_64, rollout=rollout)
        assert seen[0] == (16, "fixed") and set(seen[1:]) == {(64, "model")}
        assert ctl.round is None and ctl.last_round == {}
    fixed = ChunkSizeController(16, adaptive=False, trial_every=1)
    assert set(run(fixed, 10, SAYS_64)) == {(16, "fixed")}


def test_resuming_mid_round_continues_the_same_sequence():
    whole = run(ChunkSizeController(16, trial_every=3), 40, SAYS_64)
    mid_round = 0
    for cut in range(1, 40):        # a checkpoint after every step, rounds of the model and pinned ones
        first = ChunkSizeController(16, trial_every=3)
        head = run(first, cut, SAYS_64)
        mid_round += first.round is not None and bool(first.round["times"])
        again = ChunkSizeController(16, trial_every=3)
        again.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert head + run(again, 40 - cut, SAYS_64) == whole, cut
    assert mid_round >= 8


def test_an_old_state_dict_loads():
    ctl = ChunkSizeController(8, trial_every=2)
    ctl.load_state_dict({"chunk_size": 32})
    assert (ctl.chunk_size, ctl.source, ctl.round) == (32, "fixed", None)
    seen = run(ctl, 3, [])
    assert seen[0] == (32, "fixed") and seen[2][1] == "trial"


@pytest.mark.parametrize("override", ["rollout.chunk_trial_every=-1", "rollout.chunk_trial_margin=1.0",
                                      "rollout.chunk_trial_margin=-0.1"])
def test_invalid_trial_config_is_an_error_naming_the_value(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.") + " = "):
        load_config(None, [override])
