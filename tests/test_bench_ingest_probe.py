"""bench/ingest_probe.py's reading of a configuration (its kernel needs an sm_90 GPU; the reading
does not): per-CTA rates from the stamps, the receive rate and what the L2 served, multicast counted
once per cluster; missing stamps are an error, not a zero rate."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import ingest_probe  # noqa: E402


def test_rates_from_the_stamps_and_the_bytes_served():
    # 8 CTAs in clusters of 4 receiving 1 MB each; spans 10 us (6 CTAs) and 20 us (2)
    stamps = []
    for i in range(8):
        stamps += [1000 * i, 1000 * i + (20_000 if i in (3, 5) else 10_000)]
    r = ingest_probe.read_row(stamps, grid=8, cluster=4, multicast=True, slice_bytes=10**6, kernel_ms=0.025)
    assert r["per_cta_GBps_median"] == pytest.approx(100.0)
    assert r["per_cta_GBps_p10"] == pytest.approx(50.0)
    assert r["cta_span_us_max"] == pytest.approx(20.0)
    assert r["stamped_span_us"] == pytest.approx(25.0)          # first start 0, last end: CTA 5 at 5 + 20 us
    assert r["received_TBps"] == pytest.approx(8e6 / 25e-6 / 1e12)
    assert r["l2_served_TBps"] == pytest.approx(2e6 / 25e-6 / 1e12)   # 2 clusters, each byte once
    own = ingest_probe.read_row(stamps, grid=8, cluster=4, multicast=False, slice_bytes=10**6, kernel_ms=0.025)
    assert own["l2_served_TBps"] == pytest.approx(own["received_TBps"])


def test_a_missing_stamp_is_an_error():
    with pytest.raises(ValueError, match="missing"):
        ingest_probe.read_row([0, 10_000, 5, 0], grid=2, cluster=1, multicast=False, slice_bytes=1, kernel_ms=0.01)
