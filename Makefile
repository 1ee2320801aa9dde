# Two set-up commands for users: `make run` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
CONFIG ?= config/okx-ingest.toml

.PHONY: run test demo lint bench simulate clean compat lock bench-archive bench-archive-memory bench-replay bench-cluster \
	bench-picows schemas

# Exact versions with hashes (requirements-dev.lock = runtime + test tools; requirements.lock is the image's:
# runtime + the msk extra, so an image can sign in to Amazon MSK with IAM).
LOCK   := requirements-dev.lock

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

PIP_COMPILE := $(BIN)/pip-compile --quiet --strip-extras --generate-hashes --allow-unsafe --no-emit-index-url \
	--no-emit-find-links
lock: $(STAMP)  ## re-pin both locks after changing dependencies in pyproject.toml
	$(PIP_COMPILE) --extra msk -o requirements.lock pyproject.toml
	$(PIP_COMPILE) --extra dev -o requirements-dev.lock pyproject.toml

run: $(STAMP)  ## the daemon against OKX, writing to the embedded broker unless configured otherwise
	$(BIN)/okx-ingest run --config $(CONFIG)

demo: $(STAMP)  ## offline: the daemon against the local simulator and the embedded broker (DEMO_ARGS=--keep)
	$(BIN)/okx-ingest demo $(DEMO_ARGS)

simulate: $(STAMP)  ## the OKX simulator alone on 127.0.0.1:8765
	$(BIN)/okx-ingest simulate --host 127.0.0.1 --port 8765

test: $(STAMP)
	@bash tests/tools.sh
	$(BIN)/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check ingest tests bench
	$(BIN)/mypy --strict ingest tests bench

schemas: $(STAMP)  ## regenerate schemas/*.avsc from the Structs (ingest/core/records.py, record_docs.py)
	$(BIN)/python -m ingest.io.schemas --write schemas

compat:  ## the websockets/aiokafka internals we rely on, against the oldest and newest releases the pins allow
	PYTHON=$(PYTHON) bash tests/compat.sh

bench: $(STAMP)
	$(BIN)/python -m bench.pipeline $(BENCH_ARGS)

bench-picows: $(STAMP)  ## the recorder on picows vs on websockets, with both floors (docs/PERFORMANCE.md; needs picows)
	$(BIN)/python -m bench.picows_bench $(PICOWS_BENCH_ARGS)

bench-archive: $(STAMP)  ## the archive bench alone (docs/PERFORMANCE.md, "Archive"; 1.5-2.5 min, so not in `bench`)
	$(BIN)/python -m bench.archive_bench $(ARCHIVE_BENCH_ARGS)

bench-archive-memory: $(STAMP)  ## the archiver process's peak RSS at 1,000 instruments (docs/PERFORMANCE.md; ~1.5 min)
	$(BIN)/python -m bench.archive_memory $(ARCHIVE_MEMORY_ARGS)

bench-cluster: $(STAMP)  ## takeover, planned move, cluster vs single CPU (docs/PERFORMANCE.md, "Cluster"; ~10 min)
	$(BIN)/python -m bench.cluster_bench $(CLUSTER_BENCH_ARGS)

bench-replay: $(STAMP)  ## replay throughput as ratios to baselines of the same run (docs/PERFORMANCE.md, "Replay")
	$(BIN)/python -m bench.replay_bench $(REPLAY_BENCH_ARGS)

clean:
	rm -rf $(VENV) .venv-compat-* var .mypy_cache .ruff_cache .pytest_cache
