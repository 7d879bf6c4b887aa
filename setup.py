"""Build of oppo_runtime: setup.py drives CMake (CMakeLists.txt holds the one list of sources).

    pip install --no-build-isolation -e .      # torch must already be installed

Environment: TORCH_CUDA_ARCH_LIST (default "8.0;9.0a"), CUDA_HOME, MAX_JOBS, OPPO_CUDA=AUTO|ON|OFF.
With a CPU-only torch, or no nvcc, the host-only part is built and the CUDA kernels are off.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import torch  # noqa: F401  (fail early and clearly if torch is missing)

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = ROOT / "build" / f"cmake-py{sys.version_info.major}{sys.version_info.minor}"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DOPPO_OUTPUT_DIR={out_dir}",
            f"-DOPPO_CUDA={os.environ.get('OPPO_CUDA', 'AUTO')}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
        nvcc = Path(cuda_home, "bin", "nvcc") if cuda_home else None
        if nvcc is not None and nvcc.exists():
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        cache = build_dir / "CMakeCache.txt"
        if cache.exists() and "Ninja" not in cache.read_text(errors="ignore") and shutil.which("ninja"):
            shutil.rmtree(build_dir)
            build_dir.mkdir(parents=True)
        subprocess.check_call(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args])
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs])


setup(
    ext_modules=[CMakeExtension("oppo_runtime._C")],
    cmdclass={"build_ext": CMakeBuild},
)
