"""Helpers of the tests: import a repository script (bench/, examples/) as a module; run a check
script in a fresh interpreter (Triton reads TRITON_INTERPRET when kernels are decorated, at import)."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_script(folder: Path, name: str):
    sys.path.insert(0, str(folder))          # the script's own sibling imports
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_check(code: str, interpret: bool = False, timeout: float = 900) -> None:
    """Run ``code`` with ``python -c`` (the repository first on the path; TRITON_INTERPRET=1 when
    ``interpret``); it must exit 0 and print "ok"."""
    env = dict(os.environ)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]


def cuobjdump_path() -> str:
    """cuobjdump of the CUDA toolkit, else the one Triton ships; skips the test where neither is."""
    import shutil
    path = shutil.which("cuobjdump") or "/usr/local/cuda/bin/cuobjdump"
    if not os.path.exists(path):
        try:
            import triton
            path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        except ImportError:
            pass
    if not os.path.exists(path):
        import pytest
        pytest.skip("needs cuobjdump")
    return path


def nvcc_sm90a(source: str, workdir: Path, sass_with: str | None = None) -> tuple[str, str]:
    """Compile `source` (with kernels/ on the include path, the extension's CUDA flags) to an
    sm_90a cubin in `workdir`: ptxas's report (-v), and with `sass_with` (a cuobjdump) the SASS."""
    import shutil
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not os.path.exists(nvcc):
        import pytest
        pytest.skip("needs nvcc")
    src, cubin = workdir / "kernel.cu", workdir / "kernel.cubin"
    src.write_text(source)
    out = subprocess.run([nvcc, "-std=c++20", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v",
                          "--expt-relaxed-constexpr", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                          "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                          f"-I{ROOT / 'kernels'}", "-cubin", "-o", str(cubin), str(src)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    sass = ""
    if sass_with is not None:
        dump = subprocess.run([sass_with, "-sass", str(cubin)], capture_output=True, text=True, timeout=120)
        assert dump.returncode == 0, dump.stderr[-2000:]
        sass = dump.stdout
    return out.stdout + out.stderr, sass


def prefill_item_coords(w: int, m_tiles: int, groups: int, key_split: bool) -> tuple[int, int]:
    """Item w's (x, group) in the wgmma kernel's order (item_at): x (row tile from the last) fastest;
    the key-split kernel's: every group's x = 0 first, then the rest x fastest (kFlagKeySplit)."""
    if not key_split:
        return w % m_tiles, w // m_tiles
    if w < groups:
        return 0, w
    v = w - groups
    return 1 + v % (m_tiles - 1), v // (m_tiles - 1)
