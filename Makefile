# ecgvlm: `make test` and `make demo` build .venv themselves when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0

.PHONY: venv test test-unit test-browser reliability demo clean lock

# The virtualenv's tools first, as in an activated venv and in the test suite: the commands
# the README shows (`ecgvlm`, `ray`, `serve`) are the venv's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

# torch first: a plain `torch` requirement would pull a multi-GB CUDA build, while
# torch==2.13.0 resolves to the CPU wheel already on this machine's disk. The rest is then
# installed with that pin as a constraint, and DS_BUILD_OPS=0 keeps DeepSpeed from
# compiling its C++/CUDA ops at install time (training compiles none at run time either:
# ecgvlm.train.loop.skip_shm_comm_build).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	echo "$(TORCH_PIN)" > $(VENV)/constraints.txt
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c $(VENV)/constraints.txt -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# Two processes (pytest-xdist), each running one test file at a time. One after another, the
# tests kept 1.47 of a 2-core machine's cores busy on average; on two processes the suite took
# 955-1135 s there (six runs) against 1156-1286 s on one (two), and CI's run 1349 s against
# 1499 s before (2026-12-07; a faster machine later that day: 737-891 s, nine runs). Three
# processes overloaded it: the README walk's `ray start` timed out twice (its raylet must
# register within 30 s) at a load average of 24. Files go out in collection order, the README
# walk first (tests/conftest.py). TEST_WORKERS=0 runs them one after another in one process.
TEST_WORKERS ?= 2
test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests --ignore=tests/browser

# The reading room in a real browser: Debian's chromium, installed when it is missing (apt,
# as root or through sudo); the page's screenshot is kept as docs/images/reading_room.png.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
test-browser: venv
	command -v chromium >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }
	ECGVLM_SCREENSHOT_DIR=$(CURDIR)/docs/images $(PY) -m pytest -q tests/browser

# The reliability suite's long form: many more fuzzed requests (tests/reliability/), then the
# load benchmark (32 clients for 60 s, 256 in overload, recovery). `make test` runs the
# suite's short form.
reliability: venv
	ECGVLM_FUZZ_EXAMPLES=$${ECGVLM_FUZZ_EXAMPLES:-500} $(PY) -m pytest -q -rP tests/reliability
	PYTHONPATH=$(CURDIR) $(PY) benchmarks/load.py

test-unit: venv
	$(PY) -m pytest -q tests/unit

# The whole pipeline on local Ray with the bundled records and a tiny random PULSE; a rerun
# reuses finished stages. DEMO_ARGS passes flags through, e.g.
#   make demo DEMO_ARGS="--model-dir /models/PULSE-7B --data-root /data/cpsc2018"
demo: venv
	DS_ACCELERATOR=$${DS_ACCELERATOR:-cpu} $(PY) -m jobs.demo --output-dir runs/demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info

# Regenerate the pinned versions the Dockerfile installs (the CPU torch wheel's "+cpu" tag is
# dropped: the same version on PyPI is the CUDA build a GPU node wants).
lock: venv
	$(PY) -m pip freeze --exclude-editable | sed 's/+cpu//' | grep -v '^-e' > requirements.lock
