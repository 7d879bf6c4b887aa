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
