"""`oppo bench`: lists the benchmarks of bench/, runs one with its arguments, refuses an unknown name."""
import subprocess
import sys


def oppo(*args):
    return subprocess.run([sys.executable, "-m", "oppo_runtime.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_bench_lists_the_benchmarks_with_their_first_line():
    out = oppo("bench")
    assert out.returncode == 0, out.stderr
    names = [line.split()[0] for line in out.stdout.splitlines() if line and not line.startswith("run one")]
    assert {"decode_attention", "prefill_attention", "intra_overlap", "ppo_step", "host_probe"} <= set(names)
    assert "common" not in names and "models" not in names          # helpers, not benchmarks
    assert any("copy bandwidth" in line for line in out.stdout.splitlines() if line.startswith("decode_attention"))


def test_bench_passes_its_arguments_and_refuses_an_unknown_name():
    out = oppo("bench", "host_probe", "--help")
    assert out.returncode == 0 and "--batches" in out.stdout, out.stderr
    out = oppo("bench", "no_such_bench")
    assert out.returncode == 2 and "no benchmark 'no_such_bench'" in out.stderr and "ppo_step" in out.stderr
