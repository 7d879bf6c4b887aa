"""Scorer chunk prefill in CUDA graphs (issue 4), the parts that run on the CPU: the bucket
arithmetic, the padded static inputs (padding writes no KV, padding sequences are empty, real rows
are those of the eager path, and a forward over the padded inputs gives the eager hidden states),
and the switch (requested on the CPU: logged, eager)."""
import logging
import random

import numpy as np
import pytest
import torch

from oppo_runtime.engine.runner import (CAPTURE_ON_SIGHTING, ModelRunner, Span, _prefill_bucket, _prefill_inputs,
                                        _graph_for, _prefill_layout, _weight_fingerprint)
from oppo_runtime.engine.scorer import Scorer
from oppo_runtime.engine.sequence import Chunk, Sequence
from oppo_runtime.memory import KVGeometry, PagePool
from oppo_runtime.models import ModelConfig, build_model

CFG = dict(architectures=["Qwen2ForCausalLM"], vocab_size=80, hidden_size=32, intermediate_size=64,
           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
           rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
TPP = 4          # tokens per page
MAX_LEN = 512


@pytest.fixture(scope="module")
def critic():
    return build_model(ModelConfig.from_dict(CFG), "score", seed=3)


def make_pool(model, pages=400):
    g = KVGeometry(*model.kv_geometry(), torch.float32)
    return PagePool(pages, PagePool.page_bytes_for([g], TPP))


def shuffle_free_pages(pool, seed):
    """Make the next pages any sequence gets scattered over the pool (not 0, 1, 2, ...)."""
    fillers = [("filler", i) for i in range(pool.num_free)]
    for f in fillers:
        pool.allocate(f, 1)
    random.Random(seed).shuffle(fillers)
    for f in fillers:
        pool.free(f)


def ragged_spans(view, lens=(1, 7, 64, 200, 3), starts=(5, 0, 13, 40, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    spans = []
    for key, (n, s) in enumerate(zip(lens, starts)):
        view.ensure(key, s + n)
        spans.append(Span(key, torch.randint(0, 80, (n,), generator=g).tolist(), s))
    return spans


# ---------------------------------------------------------------------------- buckets
@pytest.mark.parametrize("tokens,seqs,max_q,want", [
    (1, 1, 1, (64, 1, 16)),           # the smallest bucket
    (64, 3, 40, (64, 4, 64)),
    (65, 3, 40, (128, 4, 64)),
    (272, 4, 200, (512, 4, 256)),     # the ragged 1 + 7 + 64 + 200 batch
    (8192, 64, 256, (8192, 64, 256)),
    (100, 100, 1, (128, 128, 16)),    # decode-shaped: 1 token per sequence
    (20, 2, 17, (64, 2, 32)),
])
def test_prefill_bucket_rounds_up_to_powers_of_two(tokens, seqs, max_q, want):
    assert _prefill_bucket(tokens, seqs, max_q) == want


def test_prefill_bucket_refuses_batches_above_the_caps():
    assert _prefill_bucket(8193, 4, 100, max_tokens=8192) is None
    assert _prefill_bucket(6000, 4, 100, max_tokens=5000) == (8192, 4, 128)    # cap = next_pow2(5000)
    assert _prefill_bucket(300, 257, 2, max_tokens=8192) is None
    with pytest.raises(ValueError):
        _prefill_bucket(10, 2, 11)                                               # a chunk longer than the batch


def test_prefill_bucket_covers_every_batch_it_takes():
    rng = random.Random(0)
    for _ in range(500):
        lens = [rng.choice([1, 2, 7, 16, 17, 64, 200, 513]) for _ in range(rng.randint(1, 40))]
        b = _prefill_bucket(sum(lens), len(lens), max(lens), max_tokens=8192)
        n_b, b_b, q_b = b
        assert sum(lens) <= n_b and len(lens) <= b_b and max(lens) <= q_b <= n_b
        assert all(x & (x - 1) == 0 for x in b)
        assert n_b < 2 * max(64, sum(lens)) and b_b < 2 * len(lens) and q_b < 2 * max(16, max(lens))


# ---------------------------------------------------------------------------- padded inputs
def test_prefill_inputs_pad_and_keep_the_real_rows(critic):
    pool = make_pool(critic)
    runner = ModelRunner(critic, pool.register("critic", KVGeometry(*critic.kv_geometry(), torch.float32), TPP),
                         MAX_LEN)
    shuffle_free_pages(pool, seed=1)
    spans = ragged_spans(runner.view)
    N, B = sum(len(s.token_ids) for s in spans), len(spans)
    bucket = _prefill_bucket(N, B, max(len(s.token_ids) for s in spans))
    n_b, b_b, q_b = bucket
    a64, a32, n32 = _prefill_inputs(spans, runner.view.pages, TPP, bucket, runner.max_blocks)
    off_cu, off_ctx, off_bt, size = _prefill_layout(b_b, runner.max_blocks)
    assert a64.shape == (3, n_b) and a32.shape == (size,) and n32 == off_bt + B * runner.max_blocks
    assert off_ctx % 16 == 0 and off_bt % 16 == 0

    ids, pos, ctx = runner._context(spans, runner.view.pages)        # the eager path's metadata
    assert (a64[0, :N] == ids.numpy()).all() and (a64[1, :N] == pos.numpy()).all()
    assert (a64[2, :N] == ctx.slot_mapping.numpy()).all()
    assert (a64[0, N:] == 0).all() and (a64[1, N:] == 0).all() and (a64[2, N:] == -1).all()
    cu = a32[off_cu:off_cu + b_b + 1]
    assert (cu[:B + 1] == ctx.cu_seqlens_q.numpy()).all()
    assert (cu[B + 1:] == N).all()                                   # padding sequences: empty
    ctx_lens = a32[off_ctx:off_ctx + b_b]
    assert (ctx_lens[:B] == ctx.context_lens.numpy()).all() and (ctx_lens[B:] == 0).all()
    bt = a32[off_bt:off_bt + B * runner.max_blocks].reshape(B, runner.max_blocks)
    width = ctx.block_tables.shape[1]
    assert (bt[:, :width] == ctx.block_tables.numpy()).all() and (bt[:, width:] == 0).all()
    for b, sp in enumerate(spans):                                   # every real slot is in its pages
        pages = runner.view.pages(sp.key)
        used = -(-(sp.start + len(sp.token_ids)) // TPP)
        assert list(bt[b, :used]) == pages[:used] and not bt[b, used:].any()


def test_prefill_inputs_reused_buffers_are_fully_reset(critic):
    """A graph's buffers are refilled by every call: a smaller batch in the same bucket must not
    leave the larger batch's slots, sequences or lengths behind."""
    pool = make_pool(critic)
    view = pool.register("critic", KVGeometry(*critic.kv_geometry(), torch.float32), TPP)
    max_blocks = view.pages_for_tokens(MAX_LEN)
    big = ragged_spans(view, lens=(30, 30, 30, 30), starts=(0, 3, 9, 1), seed=2)
    small = big[:3]
    small = [Span(s.key, s.token_ids[:5], s.start) for s in small]
    bucket = (128, 4, 32)
    a64 = np.full((3, 128), 12345, dtype=np.int64)
    a32 = np.full(_prefill_layout(4, max_blocks)[3], 777, dtype=np.int32)
    _prefill_inputs(big, view.pages, TPP, bucket, max_blocks, a64, a32)
    fresh64, fresh32, n32 = _prefill_inputs(small, view.pages, TPP, bucket, max_blocks)
    _prefill_inputs(small, view.pages, TPP, bucket, max_blocks, a64, a32)
    assert (a64 == fresh64).all()
    assert (a32[:n32] == fresh32[:n32]).all()


def test_a_new_bucket_borrows_or_runs_eager_until_its_third_request():
    captured = {(512, 8, 256): 0, (1024, 8, 256): 0, (512, 64, 512): 0, (8192, 64, 1024): 0, (256, 4, 64): 0}
    replay = lambda b: ("replay", b)   # noqa: E731
    assert _graph_for((512, 8, 256), captured, 1) == replay((512, 8, 256))     # its own graph
    assert _graph_for((512, 4, 128), captured, 1) == replay((512, 8, 256))     # rows first, then chunk, then seqs
    assert _graph_for((512, 16, 128), captured, 2) == replay((512, 64, 512))
    assert _graph_for((512, 4, 128), captured, CAPTURE_ON_SIGHTING) == ("capture", (512, 4, 128))  # seen often
    assert _graph_for((2048, 8, 256), captured, 1) == ("eager", None)          # 8192 rows: more than 2x
    assert _graph_for((64, 2, 16), captured, 1) == replay((256, 4, 64))        # small: up to 1024 rows
    assert _graph_for((4096, 64, 1024), captured, 1) == replay((8192, 64, 1024))
    assert _graph_for((512, 8, 1024), captured, 2) == ("eager", None)          # no captured chunk that long
    assert _graph_for((512, 8, 1024), captured, CAPTURE_ON_SIGHTING) == ("capture", (512, 8, 1024))
    assert _graph_for((512, 8, 256), {}, 1) == ("eager", None)
    assert _graph_for((512, 8, 256), {}, 1, eager_first=False) == ("capture", (512, 8, 256))   # sessions 12-13
    assert _graph_for((512, 4, 128), captured, 1, eager_first=False) == replay((512, 8, 256))


@pytest.mark.parametrize("borrowed", [False, True])
def test_padded_forward_equals_the_eager_forward_and_writes_no_padding_kv(critic, borrowed):
    """The graph's computation, run eagerly on the CPU references: a forward over the padded
    static inputs gives the eager hidden states on the real rows, writes K/V only into the real
    slots, and never reads pages outside the sequences' tables (poisoned with NaN here). Also
    through a larger bucket than the batch's own (``borrowed``: twice the rows, sequences and
    chunk length), as ``_graph_for`` hands out."""
    pool = make_pool(critic)
    runner = ModelRunner(critic, pool.register("critic", KVGeometry(*critic.kv_geometry(), torch.float32), TPP),
                         MAX_LEN)
    shuffle_free_pages(pool, seed=4)
    spans = ragged_spans(runner.view, seed=5)
    owned = sorted({p for sp in spans for p in runner.view.pages(sp.key)})
    pages = pool.buffer.view(pool.num_pages, pool.page_bytes)
    pool.buffer.view(torch.float32).fill_(float("nan"))
    pages[owned] = 0                              # the sequences' own prefixes: zeros
    before = pool.buffer.clone()

    hidden_eager = runner.forward(spans, runner.view.pages, last_only=False)
    kv_eager = pool.buffer.clone()

    pool.buffer.copy_(before)
    N, B = sum(len(s.token_ids) for s in spans), len(spans)
    bucket = _prefill_bucket(N, B, max(len(s.token_ids) for s in spans))
    assert bucket[0] > N and bucket[1] > B                 # padding rows and padding sequences
    if borrowed:
        bucket = (2 * bucket[0], 2 * bucket[1], min(2 * bucket[2], 2 * bucket[0]))
    a64, a32, _ = _prefill_inputs(spans, runner.view.pages, TPP, bucket, runner.max_blocks)
    flat64, flat32 = torch.from_numpy(a64), torch.from_numpy(a32)
    with torch.inference_mode():
        hidden_pad = critic(flat64[0], flat64[1], runner._prefill_context(bucket, flat64, flat32))
    assert hidden_pad.shape[0] == bucket[0]
    assert torch.isfinite(hidden_pad[:N]).all()
    torch.testing.assert_close(hidden_pad[:N], hidden_eager, atol=1e-5, rtol=1e-5)
    after = pool.buffer.view(pool.num_pages, pool.page_bytes)
    not_owned = [p for p in range(pool.num_pages) if p not in set(owned)]
    assert torch.equal(after[not_owned], before.view(pool.num_pages, pool.page_bytes)[not_owned])  # NaN bits kept
    torch.testing.assert_close(pool.buffer.view(torch.float32), kv_eager.view(torch.float32), atol=1e-6, rtol=1e-5,
                               equal_nan=True)


# ---------------------------------------------------------------------------- the switch
def stream_through(scorer, seqs, rounds):
    for r in rounds:
        for i, (seq, n) in enumerate(zip(seqs, r)):
            start = len(seq.output_ids)
            seq.output_ids += [(7 * (start + j) + 3 * i) % 80 for j in range(n)]
            scorer.submit([Chunk(seq, start, len(seq.output_ids), r is rounds[-1])])
        while scorer.pending_tokens():
            assert scorer.step()
    return [scorer.result(s.seq_id) for s in seqs]


def test_graphs_requested_on_the_cpu_are_logged_and_run_eager(critic, caplog):
    outs = []
    for graphs in (True, False):
        pool = make_pool(critic)
        with caplog.at_level(logging.INFO, logger="oppo_runtime.engine"):
            caplog.clear()
            s = Scorer("critic", critic, pool, "critic", max_model_len=MAX_LEN, graphs=graphs)
        assert not s.graphs and not s.runner.use_prefill_graphs
        msgs = [r.getMessage() for r in caplog.records]
        if graphs:
            assert any(r.levelno == logging.WARNING and "requested" in r.getMessage() and "eager" in r.getMessage()
                       and "cpu" in r.getMessage() for r in caplog.records), msgs
        else:
            assert any("scorer critic: chunk prefill eager" in m for m in msgs), msgs
        seqs = [Sequence([1 + i, 2, 3, 4, 5][: 2 + i], admit_order=i) for i in range(3)]
        outs.append(stream_through(s, seqs, [(1, 7, 20), (16, 1, 3)]))
        assert s.runner.prefill_stats == {"replays": 0, "captures": 0, "eager": 0, "capture_s": 0.0,
                                          "borrowed": 0}   # the graph path never ran
    assert outs[0] == outs[1]


def test_env_switch(critic, monkeypatch, caplog):
    monkeypatch.setenv("OPPO_SCORER_GRAPHS", "1")
    with caplog.at_level(logging.WARNING, logger="oppo_runtime.engine"):
        s = Scorer("critic", critic, make_pool(critic), "critic", max_model_len=MAX_LEN)
    assert not s.graphs and any("requested" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv("OPPO_SCORER_GRAPHS", "yes")
    with pytest.raises(ValueError, match="OPPO_SCORER_GRAPHS"):
        Scorer("critic", critic, make_pool(critic), "critic", max_model_len=MAX_LEN)
    monkeypatch.setenv("OPPO_SCORER_GRAPHS", "0")
    s = Scorer("critic", critic, make_pool(critic), "critic", max_model_len=MAX_LEN)
    assert s.runner.prefill_graphs_off_reason == "not requested"


def test_weight_fingerprint_sees_replaced_weights_not_in_place_copies():
    m = build_model(ModelConfig.from_dict(CFG), "score", seed=3)
    m.fuse_projections()
    before = _weight_fingerprint(m)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01)                              # an optimizer step: in place
    m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()})   # copy_ in place
    assert _weight_fingerprint(m) == before
    m.model.layers[0].self_attn.o_proj.weight.data = m.model.layers[0].self_attn.o_proj.weight.data.clone()
    assert _weight_fingerprint(m) != before


def test_token_slice_equals_token_at():
    from oppo_runtime.engine.scorer import _token_slice
    seq = Sequence([11, 12, 13], output_ids=[21, 22, 23, 24])
    for a in range(8):
        for b in range(a, 8):
            assert _token_slice(seq, a, b) == [seq.token_at(i) for i in range(a, b)]


def test_prefill_inputs_refuse_a_span_past_its_pages(critic):
    pool = make_pool(critic)
    view = pool.register("critic", KVGeometry(*critic.kv_geometry(), torch.float32), TPP)
    view.ensure(0, 8)                                    # 2 pages: 8 tokens
    spans = [Span(0, [1, 2, 3], 6)]                      # positions 6..8: a third page is missing
    with pytest.raises(RuntimeError, match="sequence 0"):
        _prefill_inputs(spans, view.pages, TPP, (64, 1, 16), view.pages_for_tokens(MAX_LEN))


def test_the_runner_makes_the_models_device_constants_on_the_constructing_thread():
    """A runner makes its model's per-device rotary constants (inv_freq, the cos|sin cache) when it is
    built: a scorer's first forward in the scorer thread would otherwise copy them host-to-device while
    the actor thread captures a decode graph (session 27's GPU suite failed on that copy)."""
    model = build_model(ModelConfig.from_dict(CFG), "score", seed=4)
    decoder = model.model
    assert not decoder._cos_sin_cache and not decoder._inv_freq
    pool = make_pool(model)
    ModelRunner(model, pool.register("m", KVGeometry(*model.kv_geometry(), torch.float32), TPP), MAX_LEN)
    dev = next(model.parameters()).device
    assert dev in decoder._cos_sin_cache and dev in decoder._inv_freq
