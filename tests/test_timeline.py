"""Timeline of a step: recording, busy fractions, Chrome trace and PNG export (all on the CPU)."""
import json
import time

import pytest
import torch

from oppo_runtime.engine.timeline import Timeline, TimelineSpan, _runs, stage_kind


def overlap_timeline():
    """Hand-made step: actor decodes 0-100 ms, the critic prefills two chunks under it, train at end."""
    tl = Timeline(step=3, use_cuda=False)
    tl.add("actor/stream A", "decode", 0.000, 0.100)
    tl.add("critic/stream B", "prefill chunk 0", 0.010, 0.030)
    tl.add("critic/stream B", "prefill chunk 1", 0.050, 0.080)
    tl.add("reward/stream B", "score", 0.095, 0.105)
    tl.add("train", "update_actor", 0.110, 0.200)
    return tl


def test_host_span_records_lane_name_args_and_duration():
    tl = Timeline(step=1, use_cuda=False)
    with tl.span("actor/stream A", "decode", tokens=64):
        time.sleep(0.01)
    (s,) = tl.spans
    assert (s.lane, s.name, s.args, s.step) == ("actor/stream A", "decode", {"tokens": 64}, 1)
    assert 0.009 < s.duration_s < 1.0


def test_cuda_spans_fall_back_to_host_clock_without_cuda():
    tl = Timeline(use_cuda=False)
    tl.cuda_span_begin("critic/stream B", "prefill", stream=None)
    tl.cuda_span_end("critic/stream B", "prefill")
    tl.resolve()
    assert [(s.lane, s.name) for s in tl.spans] == [("critic/stream B", "prefill")]


class FakeEvent:
    """A torch.cuda.Event stand-in whose device time is set by the test."""
    clock_ms = 0.0

    def record(self, stream=None):
        self.ms = FakeEvent.clock_ms

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return other.ms - self.ms


def test_cuda_spans_resolve_relative_to_the_reference_event():
    tl = Timeline(use_cuda=True, event_factory=FakeEvent)
    FakeEvent.clock_ms = 1000.0
    tl.mark_reference()
    ref_host = tl._refs[None][1]           # test streams have no device: key None
    FakeEvent.clock_ms = 1020.0
    tl.cuda_span_begin("critic/stream B", "prefill", stream="B", chunk=0)
    FakeEvent.clock_ms = 1050.0
    tl.cuda_span_end("critic/stream B", "prefill", stream="B")
    assert tl.spans == []                 # nothing resolved (no sync) until resolve()
    tl.resolve()
    (s,) = tl.spans
    assert s.start_s == pytest.approx(ref_host + 0.020)
    assert s.end_s == pytest.approx(ref_host + 0.050)
    assert s.args == {"chunk": 0}


class _Stream:
    """A stream stand-in on GPU ``index``."""
    def __init__(self, index):
        self.device = torch.device("cuda", index)


class DeviceClockEvent:
    """Events with one clock per GPU; like CUDA, timing across GPUs is an error."""
    clocks: dict = {}

    def record(self, stream=None):
        self.dev = None if stream is None else stream.device.index
        self.ms = DeviceClockEvent.clocks[self.dev]

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        if other.dev != self.dev:
            raise RuntimeError("elapsed time between events of different devices")
        return other.ms - self.ms


def test_spans_on_two_gpus_resolve_against_their_own_device_reference():
    # scorers placed on a second GPU: its clock is unrelated to the first GPU's
    tl = Timeline(use_cuda=True, event_factory=DeviceClockEvent)
    a, b = _Stream(0), _Stream(1)
    DeviceClockEvent.clocks = {0: 1000.0, 1: 777000.0}
    tl.mark_reference(a)
    tl.mark_reference(b)
    host0 = tl._refs[0][1]
    DeviceClockEvent.clocks = {0: 1010.0, 1: 777030.0}
    tl.cuda_span_begin("actor", "decode", a)
    tl.cuda_span_begin("critic", "prefill", b)
    DeviceClockEvent.clocks = {0: 1040.0, 1: 777050.0}
    tl.cuda_span_end("actor", "decode", a)
    tl.cuda_span_end("critic", "prefill", b)
    tl.resolve()
    got = {s.lane: (s.start_s, s.end_s) for s in tl.spans}
    assert got["actor"] == pytest.approx((host0 + 0.010, host0 + 0.040))
    host1 = tl._refs[1][1]
    assert got["critic"] == pytest.approx((host1 + 0.030, host1 + 0.050))


def test_a_gpu_without_a_reference_gets_one_at_its_first_span():
    tl = Timeline(use_cuda=True, event_factory=DeviceClockEvent)
    a, b = _Stream(0), _Stream(1)
    DeviceClockEvent.clocks = {0: 5.0, 1: 9000.0}
    tl.mark_reference(a)
    tl.cuda_span_begin("reward", "prefill", b)       # device 1's reference: now
    assert set(tl._refs) == {0, 1}
    DeviceClockEvent.clocks = {0: 6.0, 1: 9020.0}
    tl.cuda_span_end("reward", "prefill", b)
    tl.resolve()
    (s,) = tl.spans
    assert s.duration_s == pytest.approx(0.020)
    assert s.start_s == pytest.approx(tl._refs[1][1])


def test_clear_drops_unresolved_cuda_spans_of_a_warm_up():
    tl = Timeline(use_cuda=True, event_factory=FakeEvent)
    FakeEvent.clock_ms = 0.0
    tl.cuda_span_begin("critic/stream B", "warm-up prefill")
    FakeEvent.clock_ms = 5.0
    tl.cuda_span_end("critic/stream B", "warm-up prefill")
    tl.add("actor", "warm-up decode", 0.0, 0.01)
    tl.clear()
    FakeEvent.clock_ms = 100.0
    tl.mark_reference()
    tl.cuda_span_begin("critic/stream B", "prefill")
    FakeEvent.clock_ms = 110.0
    tl.cuda_span_end("critic/stream B", "prefill")
    tl.resolve()
    assert [s.name for s in tl.spans] == ["prefill"]


def test_resolve_refuses_open_spans():
    tl = Timeline(use_cuda=False)
    tl.cuda_span_begin("actor/stream A", "decode")
    with pytest.raises(RuntimeError, match="still open"):
        tl.resolve()


def test_ending_a_span_that_was_not_begun_is_an_error():
    with pytest.raises(RuntimeError, match="not begun"):
        Timeline(use_cuda=False).cuda_span_end("train", "update")


def test_busy_fraction_on_hand_made_spans():
    tl = overlap_timeline()                                   # extent 0 .. 200 ms
    assert tl.busy_fraction("actor/stream A") == pytest.approx(100 / 200)
    assert tl.busy_fraction("critic/stream B") == pytest.approx((20 + 30) / 200)
    assert tl.busy_fraction("train") == pytest.approx(90 / 200)


def test_busy_fraction_counts_overlapping_spans_once():
    tl = Timeline(use_cuda=False)
    tl.add("x", "a", 0.0, 0.6)
    tl.add("x", "b", 0.4, 0.8)
    tl.add("y", "c", 0.0, 1.0)
    assert tl.busy_s("x") == pytest.approx(0.8)
    assert tl.busy_fraction("x") == pytest.approx(0.8)


def test_busy_fraction_within_a_window():
    tl = overlap_timeline()
    assert tl.busy_fraction("critic/stream B", window=(0.0, 0.1)) == pytest.approx(0.5)


def test_hidden_and_exposed_scoring_of_a_ppo_step():
    """Scorer lanes are every lane but actor/train/update; hidden = their busy seconds under the
    actor's, summed over scorers; exposed = seconds a scorer ran and the actor did not."""
    tl = Timeline(use_cuda=False)
    tl.add("actor", "decode", 0.000, 0.040)
    tl.add("actor", "decode", 0.060, 0.100)
    tl.add("critic", "prefill", 0.030, 0.070)        # 20 ms under decode, 20 ms in the gap
    tl.add("reward", "prefill", 0.050, 0.070)        # 10 under, 10 in the gap (with the critic)
    tl.add("reward", "prefill", 0.100, 0.110)        # 10 exposed after the actor ended
    tl.add("train", "train", 0.110, 0.200)
    tl.add("update", "actor fwd+bwd", 0.120, 0.180)  # training: neither a scorer nor hidden
    assert tl.scorer_lanes() == ["critic", "reward"]
    assert tl.hidden_fraction() == pytest.approx((0.020 + 0.010) / (0.040 + 0.030))
    assert tl.exposed_s() == pytest.approx(0.020 + 0.010)
    assert tl.union_s(["critic", "reward"]) == pytest.approx(0.050)
    assert tl.overlap_s(["critic", "reward"], ["actor"]) == pytest.approx(0.020)
    assert tl.union_s() == pytest.approx(0.200)
    assert Timeline(use_cuda=False).hidden_fraction() == 0.0


def test_the_picture_draws_runs_of_one_name_as_one_bar():
    """Thousands of decode spans become one bar per run (gaps under a pixel); other names and
    real gaps stay apart, so the update's phases keep their own bars."""
    tl = Timeline(use_cuda=False)
    for i in range(100):
        tl.add("actor", "decode", i * 0.010, i * 0.010 + 0.0099)      # 0.1 ms gaps
    tl.add("actor", "prefill", 1.0, 1.01)
    tl.add("actor", "decode", 1.01, 1.02)
    tl.add("actor", "decode", 1.5, 1.6)                                # a real gap: a bar of its own
    runs = _runs(sorted(tl.spans, key=lambda s: s.start_s), gap_s=0.001)
    assert [(r.name, r.kind) for r in runs] == [("decode x100", "decode"), ("prefill", "prefill"),
                                                ("decode", "decode"), ("decode", "decode")]
    assert runs[0].start_s == 0.0 and runs[0].end_s == pytest.approx(0.9999)
    phases = [TimelineSpan("update", n, i, i + 1, {"kind": "train"}) for i, n in enumerate(("actor", "critic"))]
    assert [r.name for r in _runs(phases, gap_s=0.5)] == ["actor", "critic"]
    assert len(tl.spans) == 103                                        # the timeline itself is unchanged


def test_merge_appends_after_the_end_and_keeps_steps():
    a, b = overlap_timeline(), overlap_timeline()
    b.step = 4
    for s in b.spans:
        s.step = 4
    a.merge(b)
    assert a.extent() == pytest.approx((0.0, 0.4))
    assert {s.step for s in a.spans} == {3, 4}
    assert a.busy_fraction("train") == pytest.approx(2 * 90 / 400)


def test_merge_with_explicit_offset():
    a = Timeline(use_cuda=False)
    a.add("train", "update", 0.0, 0.1)
    b = Timeline(use_cuda=False)
    b.add("train", "update", 0.0, 0.1)
    a.merge(b, offset=1.0)
    assert [s.start_s for s in a.spans] == [0.0, 1.0]


def test_stage_kind_from_span_names():
    assert [stage_kind(n) for n in ("actor prefill", "decode", "critic prefill chunk 3", "reward score",
                                    "ref logprobs", "update_critic", "idle")] == \
        ["prefill", "decode", "prefill", "score", "score", "train", "other"]


def test_chrome_trace_is_valid_json_with_lane_names(tmp_path):
    path = overlap_timeline().to_chrome_trace(tmp_path / "trace.json")
    trace = json.loads(path.read_text())
    events = trace["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert len(spans) == 5
    assert all(e["pid"] == 3 for e in events)
    assert sorted(names.values()) == sorted(["actor/stream A", "critic/stream B", "reward/stream B", "train"])
    decode = next(e for e in spans if e["name"] == "decode")
    assert (names[decode["tid"]], decode["ts"], decode["dur"], decode["cat"]) == \
        ("actor/stream A", 0.0, pytest.approx(100_000.0), "decode")


def test_png_is_written(tmp_path):
    path = overlap_timeline().to_png(tmp_path / "step.png", title="OPPO step")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_png_of_an_empty_timeline_does_not_fail(tmp_path):
    assert Timeline(use_cuda=False).to_png(tmp_path / "empty.png").stat().st_size > 0
