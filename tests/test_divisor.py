"""kernels/common.cuh's Divisor: the prefill kernels divide by the GQA group, the kv heads, the row
tiles and the page size, the decode split kernel by the page size, each with a multiply-high and a
shift (the multiplier made on the host, the quotient on the device with __umulhi). Its host path
computes the same 32-bit arithmetic, so a host program checks the formula against the hardware
division: every n below 2^18 for every divisor up to 1024, the whole range [0, 2^31) for divisors 3,
7 and 192, and for every divisor up to 2^16 and the divisors around each power of two up to 2^31 - 1
the n where an error would show first (each multiple of d and its neighbours near the top of the
range, 0, 1, d - 1, d, d + 1). A divisor below 1 is refused with std::invalid_argument."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROGRAM = r"""
#include "common.cuh"
#include <cstdio>
using oppo::Divisor;
static long long bad = 0;
static void check(const Divisor& v, int n) {
  const int d = v.d;
  if (n / v != n / d || n % v != n % d) {
    if (bad++ < 5) std::printf("n=%d d=%d: %d %d, want %d %d\n", n, d, n / v, n % v, n / d, n % d);
  }
}
int main() {
  const int top = 0x7fffffff;
  long long checks = 0;
  for (int d = 1; d <= 1024; ++d) {
    const Divisor v(d);
    for (int n = 0; n < (1 << 18); ++n) check(v, n);
    checks += 1 << 18;
  }
  for (int d : {3, 7, 192}) {
    const Divisor v(d);
    for (int n = 0;; ++n) { check(v, n); ++checks; if (n == top) break; }
  }
  auto edges = [&](int d) {
    const Divisor v(d);
    for (int n : {0, 1, d - 1, d, d == top ? d : d + 1, top, top - 1}) { check(v, n); ++checks; }
    const int qmax = top / d;
    for (int q = qmax; q >= 0 && q > qmax - 64; --q) {
      const long long m = 1LL * q * d;
      for (long long n = m - 1; n <= m + 1; ++n)
        if (n >= 0 && n <= top) { check(v, static_cast<int>(n)); ++checks; }
    }
  };
  for (int d = 1; d <= (1 << 16); ++d) edges(d);
  for (int s = 1; s <= 31; ++s) {
    const long long p = 1LL << s;
    for (long long d = p - 3; d <= p + 3; ++d)
      if (d >= 1 && d <= top) edges(static_cast<int>(d));
  }
  bool refused = false;
  try { Divisor zero(0); } catch (const std::invalid_argument&) { refused = true; }
  if (!refused) { std::printf("Divisor(0) accepted\n"); ++bad; }
  std::printf("%lld checks, %lld wrong\n", checks, bad);
  return bad != 0;
}
"""


def test_divisor_matches_division(tmp_path):
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not Path(nvcc).exists():
        pytest.skip("needs nvcc (the header includes cuda_runtime.h)")
    src, exe = tmp_path / "t.cu", tmp_path / "t"
    src.write_text(PROGRAM)
    subprocess.run([nvcc, "-std=c++20", "-O2", f"-I{ROOT / 'kernels'}", str(src), "-o", str(exe)],
                   check=True, capture_output=True, text=True, timeout=300)
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and " 0 wrong" in out.stdout, out.stdout[-2000:]
