# The two commands of the README:
#   make train   set up, then a small PPO run on the embedded default (GPU if present, else CPU)
#   make test    set up, then the test suite (GPU tests run only where CUDA is present)
PY ?= python3
ARGS ?=

.PHONY: setup train test doctor
setup:
	bash scripts/setup.sh

train: setup
	$(PY) -m oppo_runtime.cli train $(ARGS)

test: setup
	$(PY) -m oppo_runtime.cli doctor
	$(PY) -m pytest -q -p no:cacheprovider tests

doctor: setup
	$(PY) -m oppo_runtime.cli doctor
