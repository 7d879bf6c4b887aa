"""bench/decode_tiles.py's reading of the per-tile stamps, without a GPU: a synthetic call of three
CTAs (one merging its group, one that does not, one split past its context) whose stamps are known,
read back as the ramp, the tile interval, the end's parts and the rate per time bin."""
from pathlib import Path

import pytest
import torch

from _scripts import load_script

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _cta(rows: list[tuple[float, int, int]], sm: int = 3) -> torch.Tensor:
    """One CTA's rows from (us after t0 = 1 s, event, tile)."""
    t = torch.zeros(128, 3, dtype=torch.int64)
    for i, (us, e, tile) in enumerate(rows):
        t[i] = torch.tensor([10**9 + int(us * 1000), e | (tile << 8), sm])
    return t


def test_stamps_read_back_as_ramp_tiles_end_and_rate():
    d = load_script(BENCH, "decode_tiles")
    S, I, L, E, ST, END = d.START, d.ISSUED, d.LANDED, d.LOOP_END, d.STORED, d.END
    a = _cta([(0, S, 0), (0.5, I, 0), (2, L, 0), (5, L, 1), (8, L, 2), (8.5, E, 0), (9, ST, 0), (11, END, 1)])
    b = _cta([(1, S, 0), (1.5, I, 0), (4, L, 0), (7, L, 1), (7.5, E, 0), (8, ST, 0), (8.5, END, 0)])
    c = _cta([(0.2, S, 0)])                                   # a split past its context: its start only
    st = torch.stack([a, b, c])
    tile = 1000
    r = d.analyse(st, [[tile] * 3, [tile] * 2, []], bw=1e9, bin_us=4.0)
    assert r["ctas"] == 2 and r["span_us"] == 11
    assert r["start_us_max"] == 1 and r["issued_us_p50"] == 0.5 and r["tiles_dropped_ctas"] == 0
    # a CTA whose landings outran its rows (four tiles, three rows) is counted, not misread
    assert d.analyse(st, [[tile] * 4, [tile] * 2, []], bw=1e9, bin_us=4.0)["tiles_dropped_ctas"] == 1
    assert r["ramp_us_p10"] == 2 and r["ramp_us_max"] == 3          # 2 - 0 and 4 - 1
    assert r["first_tile_all_us"] == 4
    assert r["tile_interval_us_p50"] == 3                            # every interval is 3 us
    assert r["last_tile_us_max"] == 8 and r["last_tile_to_loop_end_us_p50"] == 0.5
    assert r["merges"] == 1 and r["merge_us_p50"] == 2               # 11 - 9, the merging CTA only
    # bytes landed per 4 us bin: [0, 4): tile at 2; [4, 8): tiles at 4, 5, 7; [8, 12): tile at 8
    rate = r["rate_frac_copy_bw_by_bin"]
    assert [round(x * 4e-6 * 1e9 / tile) for x in rate] == [1, 3, 1]


def test_stamps_of_no_launch_are_a_clear_error():
    d = load_script(BENCH, "decode_tiles")
    st = torch.zeros(2, 128, 3, dtype=torch.int64)
    st[0, 0] = torch.tensor([10**9, d.START, 1])             # a start without an end
    with pytest.raises(ValueError, match="start and its end"):
        d.analyse(st, [[], []], bw=1e9, bin_us=2.0)


def test_dram_probe_reading_bins_the_chase_against_the_call():
    """decode_tiles --probe: the chase's (issue ns, latency ns) pairs read against the stamped call's
    first start (t0 = 1 s) and last end: the median latency per bin from 4 us before the call, the
    loads inside the call counted, and the idle latency from loads a period past its end."""
    d = load_script(BENCH, "decode_tiles")
    S, I, L, E, ST, END = d.START, d.ISSUED, d.LANDED, d.LOOP_END, d.STORED, d.END
    st = torch.stack([_cta([(0, S, 0), (0.5, I, 0), (2, L, 0), (7, E, 0), (8, ST, 0), (9, END, 0)]),
                      _cta([(1, S, 0), (1.5, I, 0), (3, L, 0), (8, E, 0), (9, ST, 0), (10, END, 1)])])
    # loads issued at -3 us (idle 0.7), 1, 1.5 and 9 us (queued 3.0, 5.0, 2.0), 25 us (idle 0.6), 30 (0.8)
    issue = [-3, 1, 1.5, 9, 25, 30]
    lat = [0.7, 3.0, 5.0, 2.0, 0.6, 0.8]
    pout = torch.tensor([[10**9 + int(a * 1000), int(x * 1000)] for a, x in zip(issue, lat)] + [[0, 0]],
                        dtype=torch.int64).flatten()
    r = d.probe_reading(st, pout, period_us=12.0, bin_us=4.0)
    assert r["probe_samples"] == 3                       # 1, 1.5 and 9 us are inside [0, 10)
    assert r["probe_idle_us"] == 0.8                     # issued past 10 + 12 us: 0.6 and 0.8, the upper median
    # bins of 4 us from -4 to 16: [-4, 0): 0.7; [0, 4): 3.0 and 5.0 (upper median); [4, 8): none; [8, 12): 2.0; [12, 16): none
    assert r["probe_latency_us_by_bin"] == [0.7, 5.0, None, 2.0, None]
