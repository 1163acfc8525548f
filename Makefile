# make test   creates .venv when missing, installs, runs the tests offline
# make demo   the whole SegGen chain on the toy world at reduced size, every model learned here (no GPU, no download, ~10 min)
# make smoke  the plumbing only: tiny random models on the built-in real samples
# make bench  prints the benchmarks of bench/

VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU := torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error
export DIFFUSERS_VERBOSITY := error
export PYTHONPATH := $(CURDIR)
# Idle OpenMP threads sleep instead of spinning: on a busy machine spinning made a tiny step 20-100x slower
# (bench/threads.py, common/runtime/threads.py). A value already in the environment wins.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install test demo smoke bench clean

install: $(VENV)/.installed

# Without CUDA, install the pinned CPU torch first so that requirements.txt does not pull a CUDA build.
$(VENV)/.installed: requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q $(TORCH_CPU); fi
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# The browser tests (tests/test_browse.py) need Debian's chromium: installed here where apt-get can, else they skip saying why.
test: install
	command -v chromium >/dev/null 2>&1 || (apt-get update -q && apt-get install -y -q chromium) >/dev/null 2>&1 || echo "no chromium (apt-get install -y chromium): the browser tests will skip"
	$(PY) -m pytest -q tests

demo: install
	./reproduce.sh --preset toy --size demo --work runs/demo

smoke: install
	./reproduce.sh --preset tiny --work runs/smoke

bench: install
	$(PY) bench/colormap.py
	$(PY) bench/caption.py
	$(PY) bench/train_step.py
	$(PY) bench/sampling.py
	$(PY) bench/train_seg.py
	$(PY) bench/loader.py
	$(PY) bench/imgsyn_plumbing.py

clean:
	rm -rf $(VENV) runs/demo runs/smoke
