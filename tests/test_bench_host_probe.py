"""bench/host_probe.py (the engine's host time per decode step over a stub model) runs every mode
on a small batch, so that the probe NOTES quotes cannot rot; its subprocess keeps the probe's
environment switches and stub sampler out of the other tests."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_mode_runs_and_reports_host_time(tmp_path):
    out = tmp_path / "host_probe.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "host_probe.py"), "--batches", "4", "--new", "20",
                    "--reps", "1", "--out", str(out)], check=True, capture_output=True, text=True, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["sync", "async", "static", "static_gs"]
    for r in rows:
        assert r["B"] == 4 and r["steps"] >= 20 and 0 < r["host_ms"] <= r["wall_ms"]
