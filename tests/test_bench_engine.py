"""bench/engine.py's parts that run without a GPU: the --decode-env variants' parser."""
from pathlib import Path

import pytest

from _scripts import load_script

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_decode_env_variants_parse_and_refuse_non_runtime_variables():
    e = load_script(BENCH, "engine")
    assert e.parse_decode_env(["pdl:OPPO_DECODE_PDL=1", "l2x2:OPPO_DECODE_PREFETCH=2,OPPO_DECODE_PLAN=v6"]) == {
        "pdl": {"OPPO_DECODE_PDL": "1"}, "l2x2": {"OPPO_DECODE_PREFETCH": "2", "OPPO_DECODE_PLAN": "v6"}}
    assert e.parse_decode_env([]) == {}
    for bad in ("pdl", "pdl:", ":OPPO_DECODE_PDL=1", "x:PATH=/tmp"):
        with pytest.raises(AssertionError, match="bad variant"):
            e.parse_decode_env([bad])


def test_device_alone_step_is_the_median_of_its_rounds(monkeypatch):
    """gpu_only_ms: the step's graph (and the head and sampler when outside it) replayed in rounds,
    the median round kept: one slow round does not move it."""
    import torch
    e = load_script(BENCH, "engine")
    rounds = iter([40.0, 20.0, 22.0, 21.0, 90.0])            # ms of 20 replays each
    monkeypatch.setattr(e, "events_ms", lambda fn, n: (fn(), next(rounds))[1])
    replays = []

    class Graph:
        def replay(self):
            replays.append(1)

    class Runner:
        graph_batch_sizes = [8, 16]
        graphs = {16: (Graph(), {"input_ids": torch.zeros(16, dtype=torch.long)})}

    class Eng:
        runner, graph_sampling = Runner(), True

    assert e.gpu_only_ms(Eng(), 12) == 22.0 / 20
    assert len(replays) == 1 + 5                               # a warm-up replay, then one per round here
