"""csrc/check_text.h: the launchers' check messages are built without iostream number formatting
(a failed check with an integer in its message crashed the process on the GPU machine's build,
session 14; NOTES "Session 14"). Compiled here with the host compiler and run: every supported
type renders as expected, and the header itself instantiates no ostream insertion."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROGRAM = r"""
#include "check_text.h"
#include <cstdint>
#include <cstdio>
int main() {
  const std::string s = oppo::check_text("op", ": workspace holds ", int64_t{-3}, " floats, needs ", 7u,
                                         " (", std::string("x"), std::string_view("y"), ' ', true, ", ",
                                         0.5, ", ", 1e20f, ")");
  std::fputs(s.c_str(), stdout);
  std::fputs("|", stdout);
  std::fputs(oppo::check_text().c_str(), stdout);
  return 0;
}
"""


def _compiler():
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    return cxx


def test_check_text_renders_every_supported_type(tmp_path):
    src, exe = tmp_path / "t.cpp", tmp_path / "t"
    src.write_text(PROGRAM)
    subprocess.run([_compiler(), "-std=c++20", "-O2", f"-I{ROOT / 'csrc'}", str(src), "-o", str(exe)],
                   check=True, capture_output=True, text=True, timeout=120)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=30).stdout
    assert out == "op: workspace holds -3 floats, needs 7 (xy true, 0.5, 1e+20)|"


def test_check_text_uses_no_ostream(tmp_path):
    """The object code of the header's instantiations calls no ostream member (the crash was in
    std::ostream::_M_insert<long>): numbers go through std::to_string and snprintf."""
    src, obj = tmp_path / "t.cpp", tmp_path / "t.o"
    src.write_text(PROGRAM)
    subprocess.run([_compiler(), "-std=c++20", "-O2", "-c", f"-I{ROOT / 'csrc'}", str(src), "-o", str(obj)],
                   check=True, capture_output=True, text=True, timeout=120)
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm")
    syms = subprocess.run([nm, "-C", str(obj)], check=True, capture_output=True, text=True).stdout
    assert "ostream" not in syms and "_M_insert" not in syms, syms


def test_launchers_check_through_oppo_check():
    """Every check of the launchers formats its message with check_text: a bare TORCH_CHECK with a
    number in its message is the crash above (dispatch.h defines OPPO_CHECK on top of it)."""
    bare = [f"{p.name}:{i}" for p in sorted((ROOT / "csrc").glob("*.c*")) + [ROOT / "csrc" / "cuda_ops.h"]
            for i, line in enumerate(p.read_text().splitlines(), 1) if "TORCH_CHECK(" in line]
    assert bare == [], bare
