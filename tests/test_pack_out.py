"""bench/pack_out.sh: a device call's output folder shrunk to what comes back (<= 8 files)."""
import gzip
import json
import subprocess
import sys
import tarfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "pack_out.sh"


def test_traces_are_summed_and_deleted_and_the_rest_tarred(tmp_path):
    (tmp_path / "sub").mkdir()
    for i in range(7):
        (tmp_path / f"f{i}.json").write_text("{}")
    (tmp_path / "report.md").write_text("r")
    (tmp_path / "log.txt").write_text("l")
    ev = [{"ph": "X", "cat": "user_annotation", "name": "engine/prefill", "ts": 100, "dur": 50, "pid": 1, "tid": 1},
          {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 110, "dur": 1, "pid": 1, "tid": 1,
           "args": {"correlation": 1}},
          {"ph": "X", "cat": "kernel", "name": "prefill_attn", "ts": 300, "dur": 10, "pid": 1, "tid": 7,
           "args": {"correlation": 1}}]
    with gzip.open(tmp_path / "sub" / "ppo_step_G_full_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": ev}, f)
    r = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt", "report.md", "results.tgz"]
    with tarfile.open(tmp_path / "results.tgz") as t:
        names = set(t.getnames())
        assert "./f6.json" in names and not any(n.endswith(".json.gz") for n in names)
        text = t.extractfile("./sub/ppo_step_G_full_trace.phases.txt").read().decode()
    assert "| engine/prefill | 1 |" in text and "prefill_attn" in text


def test_a_small_folder_is_left_as_it_is(tmp_path):
    for n in ("report.md", "log.txt", "a.json"):
        (tmp_path / n).write_text("x")
    r = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "log.txt", "report.md"]
