"""The chunk-size cost model (ppo/controllers.py)."""
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
