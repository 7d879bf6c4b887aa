"""bench/common.py's stamp_stats (read by bench/decode_stamps.py and bench/sm_balance_probe.py),
on stamps whose answer is known."""
from pathlib import Path

import pytest
import torch

from _scripts import load_script

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_stamp_stats_splits_sm_idle_into_the_ramp_and_the_end():
    c = load_script(BENCH, "common")
    us = 1000   # stamps are ns
    t0 = 5_000_000
    rows = [  # start, end (us from t0), SM
        (0, 10, 0), (0, 10, 0),      # SM 0: two CTAs, busy 0-10
        (2, 8, 1),                   # SM 1: starts at 2, ends at 8
        (1, 6, 2), (6, 10, 2),       # SM 2: two in a row, 1-10
    ]
    s = torch.zeros(7, 3, dtype=torch.int64)      # two rows of CTAs that never ran: dropped
    for i, (a, e, m) in enumerate(rows):
        s[i] = torch.tensor([t0 + a * us, t0 + e * us, m])
    st = c.stamp_stats(s, sms=4)                  # SM 3 never used: idle for the whole span
    assert st["ctas"] == 5 and st["sms_used"] == 3 and st["span_us"] == pytest.approx(10)
    # end: SM 1 idles 8..10, SM 3 0..10 -> (2 + 10) / (4 x 10)
    assert st["sm_idle_fraction"] == pytest.approx(12 / 40)
    # start: SM 1 from 0 to 2, SM 2 from 0 to 1 -> 3 / 40
    assert st["sm_idle_start_fraction"] == pytest.approx(3 / 40)
    assert (st["programs_per_sm_min"], st["programs_per_sm_max"]) == (1, 2)
    assert (st["cta_us_min"], st["cta_us_median"], st["cta_us_max"]) == pytest.approx((4, 6, 10))
    assert st["cta_us_by_load"] == {"1": 6.0, "2": 7.5}       # SM 0: 10, 10; SM 2: 5, 4 -> median of the four
    assert st["last_start_us"] == pytest.approx(6)
    assert st["sm_finish_us_by_smid"] == [10.0, 8.0, 10.0, 0.0]


def test_stamp_stats_reads_the_sm_below_a_tag():
    c = load_script(BENCH, "common")
    s = torch.tensor([[1000, 5000, 3 | (7 << 32)], [1000, 3000, 1 | (9 << 32)]], dtype=torch.int64)
    assert c.stamp_stats(s, sms=4)["sm_finish_us_by_smid"] == [0.0, 2.0, 0.0, 4.0]


def test_stamp_stats_reads_the_sm_clock_from_a_cycle_tag():
    """clock_tag: the tag is the CTA's SM cycles; CTAs under 2 us (the timer's grain) are left out."""
    c = load_script(BENCH, "common")
    rows = [(0, 10_000, 0, 17_000), (0, 5_000, 1, 9_000), (0, 20_000, 2, 38_000), (0, 1_000, 3, 99_000)]
    s = torch.tensor([[a, e, m | (cyc << 32)] for a, e, m, cyc in rows], dtype=torch.int64)
    st = c.stamp_stats(s, sms=4, clock_tag=True)
    assert (st["sm_mhz_p10"], st["sm_mhz_median"], st["sm_mhz_p90"]) == pytest.approx((1700, 1800, 1900))
    assert "sm_mhz_median" not in c.stamp_stats(s, sms=4)          # a tag that is not cycles: no clock
    assert st["sm_finish_us_by_smid"] == [10.0, 5.0, 20.0, 1.0]    # the SM id below the cycles


def test_prefill_item_fit_recovers_overhead_per_item_and_time_per_tile():
    """bench/prefill_stamps.py's fit: items of 1-30 key tiles lasting 3 us + 0.5 us per tile, four
    per SM back to back with 0.25 us between them, give a = 3, b = 0.5, gap 0.25."""
    p = load_script(BENCH, "prefill_stamps")
    rows, t = [], {}
    for i in range(40):
        sm, tiles = i % 10, 1 + (7 * i) % 30
        start = t.get(sm, 10_000)
        end = start + int((3.0 + 0.5 * tiles) * 1000)
        rows.append([start, end, sm | (tiles << 32)])
        t[sm] = end + 250
    s = torch.tensor(rows + [[0, 0, 0]], dtype=torch.int64)       # an item that did not run
    fit = p.fit_items(s)
    assert fit["items"] == 40 and (fit["tiles_min"], fit["tiles_max"]) == (1, 30)
    assert fit["item_overhead_us"] == pytest.approx(3.0, abs=1e-6)
    assert fit["tile_us"] == pytest.approx(0.5, abs=1e-6) and fit["fit_r2"] == pytest.approx(1.0)
    assert fit["gap_us"] == pytest.approx(0.25)
    same = s.clone()
    same[:, 2] = (same[:, 2] & 0xFFFFFFFF) | (4 << 32)                 # one tile count: no fit, a mean
    assert p.fit_items(same)["item_overhead_us"] is None
    assert fit["short_items"] == 0 and fit["short_item_us_median"] is None
    # two key-split items (tag bit 20) of 20 tiles lasting 2 us: timed apart, out of the fit
    split = torch.tensor([[50_000, 52_000, 3 | ((20 | (1 << 20)) << 32)],
                          [60_000, 62_000, 4 | ((20 | (1 << 20)) << 32)]], dtype=torch.int64)
    fit2 = p.fit_items(torch.cat([s, split]))
    assert fit2["items"] == 42 and fit2["short_items"] == 2 and fit2["short_item_us_median"] == pytest.approx(2.0)
    assert fit2["item_overhead_us"] == pytest.approx(3.0, abs=1e-6) and fit2["tiles_max"] == 30
    only = p.fit_items(split)                                          # every item split: timed, and fitted as they are
    assert only["short_items"] == 2 and only["items"] == 2 and only["tiles_max"] == 20


def _stamps(rows):
    return torch.tensor([[a, e, m] for a, e, m in rows], dtype=torch.int64)


def test_the_stamp_benches_rows_print_as_their_tables(capsys):
    """decode_stamps.py's and prefill_stamps.py's rows, built from stamps as their main() builds
    them, go through their tables' formats (an int under a string format, say, would raise only on
    the GPU, after the measurements)."""
    c = load_script(BENCH, "common")
    d = load_script(BENCH, "decode_stamps")
    p = load_script(BENCH, "prefill_stamps")
    ctas = _stamps([(1000, 9000, 0), (1500, 8000, 1), (1200, 9500, 1)])
    st = c.stamp_stats(ctas, sms=2)
    row = d.cta_row((256, 1024, 14, 2, 64), "v3+l2", 134_217_728, 0.041, 4.2e12, st)
    assert row["outside_us"] == pytest.approx(41.0 - 8.5) and row["active_frac_copy"] > row["frac_copy_bw"]
    c.print_table([row], d.COLUMNS)
    items = _stamps([(1000, 5000, 3 | (4 << 32)), (5200, 13200, 3 | (12 << 32)), (1000, 7000, 5 | (8 << 32))])
    prow = p.item_row((64, 1024, 256, 14, 2, 64), "wgmma3_pp_ov_qp_ps", 6.77e10, 0.2, 7.5e14, 132,
                      c.stamp_stats(items, sms=132), p.fit_items(items))
    assert prow["prefix"] == "1024" and prow["tile_us"] == pytest.approx(0.5)
    assert prow["tile_us_floor"] == pytest.approx(4 * 192 * 128 * 64 / (7.5e14 / 132) * 1e6)
    spread = dict(prow, prefix=p.item_row((32, "spread", 256, 14, 2, 64), "wgmma_pp_ov_ps", 1e10, 0.1, 7.5e14, 132,
                                          c.stamp_stats(items, sms=132), p.fit_items(items))["prefix"])
    c.print_table([prow, spread], p.COLUMNS)
    out = capsys.readouterr().out
    assert "v3+l2" in out and "wgmma3_pp_ov_qp_ps" in out and "0-4096" in out


def _turn_events(items, period=1000, extra=3000, q=400, epi=500):
    """One consumer warpgroup's events as the wgmma3 kernel writes them (cycles, event, tile,
    item), for items of the given key tiles: every turn `period` cycles apart (request, turn +10,
    issued +20, S +100, scores +300, P V +400, the tile's end +450), each item change `extra`
    cycles longer than two turns, its rows stored `epi` after the last P V, its Q staged in `q`."""
    t = 0
    ev = []
    for w, n in enumerate(items):
        ev += [(t, 0, n, w), (t + q, 1, 0, w)]
        t += q + 10
        for tile in range(n + 1):                   # tile n: the last P V alone
            ev += [(t, 2, tile, w), (t + 10, 3, tile, w), (t + 20, 4, tile, w)]
            if tile == 0:                           # Q K^T alone: S, scores, the tile's end
                ev += [(t + 100, 5, 0, w), (t + 300, 6, 0, w), (t + 450, 8, 0, w)]
            elif tile < n:
                ev += [(t + 100, 5, tile, w), (t + 300, 6, tile, w), (t + 400, 7, tile, w), (t + 450, 8, tile, w)]
            else:
                ev += [(t + 400, 7, tile, w), (t + 400 + epi, 9, n, w)]
            t += period
        t += extra - (q + 10) - period             # the boundary: (last steady -> next tile 1) = 2 periods + extra
    return ev


def test_prefill_turns_splits_each_turn_and_the_item_boundary():
    p = load_script(BENCH, "prefill_turns")
    ev = _turn_events([5, 4, 6])
    ph = p.phases(p.turns(ev))
    steady = [x for x in ph if x["kind"] == "steady"]
    assert len(steady) == 4 + 3 + 5 and len([x for x in ph if x["kind"] == "first"]) == 3
    x = steady[0]
    assert (x["wait_turn"], x["issue"], x["s_wait"], x["softmax"], x["pv_wait"], x["finish"]) == (10, 10, 80, 200, 100, 50)
    assert x["period"] == 1000 and x["to_next"] == 550
    costs = p.item_costs(ev, ph)
    assert [c["boundary"] for c in costs] == [3000, 3000]
    assert all(c["epilogue"] == 500 and c["q_stage"] == 400 for c in costs)
    # rows as the kernel lays them out: 2 CTAs x 3 warpgroups, one slice each (here all alike)
    per = 256
    rows = torch.zeros(6 * per, 3, dtype=torch.int64)
    for k in range(6):
        for i, (c, e, t, w) in enumerate(ev):
            rows[k * per + i] = torch.tensor([c + 1, e | (t << 8), w])
    s = p.summarize(rows, mhz=1000.0)               # 1000 cycles per us
    wg = s["by_warpgroup"][4]
    assert (wg["cta"], wg["warpgroup"], wg["items"]) == (1, 1, 3)
    assert wg["steady"]["period"] == pytest.approx(1.0) and wg["steady"]["softmax"] == pytest.approx(0.2)
    assert wg["epilogue_us"] == pytest.approx(0.5) and wg["q_stage_us"] == pytest.approx(0.4)
