"""Import a repository script (bench/, examples/) as a module, for tests that drive it."""
import importlib.util
import sys
from pathlib import Path


def load_script(folder: Path, name: str):
    sys.path.insert(0, str(folder))          # the script's own sibling imports
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
