"""OPPO_TEST_SHARD=i/n (tests/conftest.py; bench/pytest_shards.sh on the GPU machine): the shards
partition the collected tests, and a malformed value is an error, not a silent full run."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def collect(shard=None):
    env = dict(os.environ)
    env.pop("OPPO_TEST_SHARD", None)
    if shard:
        env["OPPO_TEST_SHARD"] = shard
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "tests/test_timeline.py"], cwd=ROOT, env=env, capture_output=True, text=True)
    return out.returncode, [line for line in out.stdout.splitlines() if "::" in line], out.stderr + out.stdout


def test_shards_partition_the_tests():
    rc, every, _ = collect()
    assert rc == 0 and len(every) > 6
    shards = [collect(f"{i}/3")[1] for i in range(3)]
    assert all(shards) and sorted(sum(shards, [])) == sorted(every)


def test_a_malformed_shard_is_an_error():
    rc, _, text = collect("3/3")
    assert rc != 0 and "OPPO_TEST_SHARD" in text
