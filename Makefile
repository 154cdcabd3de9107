# dltrain: `make run` and `make test` do all the set-up on a fresh machine, and are safe to
# re-run (quiet when there is nothing to do).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.dltrain-installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist
PYTEST_ARGS ?=

# Stage commands in dvc.yaml call `dltrain`, `dvc` calls them: both must come from the venv.
export PATH := $(BIN):$(PATH)

.PHONY: help setup data-package run test test-quick lint clean-outputs stack-up stack-down deploy deploy-cluster \
	cluster-up cluster-down ray-up ray-down mlflow-ui

help:
	@echo "make run    set up, run the pipeline (dvc repro), then summarize it (dltrain summary)"
	@echo "make test   set up, then run the whole test suite (what CI runs)"
	@echo "make test-quick  the unit tier only: no Ray, no servers, no subprocess pipelines"
	@echo "make lint   ruff check, lint-imports (the layers) and deptry (declared dependencies)"
	@echo "make stack-up    start a local Prefect server + worker (PREFECT_HOME, PREFECT_SERVER_API_PORT), and ray-up;"
	@echo "                 its Prefect profile dltrain-local becomes the CLI's active profile"
	@echo "make stack-down  stop them, and ray-down; the previous Prefect profile is active again"
	@echo "make ray-up      a warm Ray head with all CPUs that dltrain train reuses (.ray/, DLTRAIN_RAY_DIR)"
	@echo "make ray-down    stop exactly that head"
	@echo "make deploy      deploy the on-demand local deployment (and its work pool)"
	@echo "make deploy-cluster  deploy the weekly scheduled-retraining (its worker: on the Ray head)"
	@echo "make cluster-up WORKERS=N   a local multi-node Ray cluster (head + N worker nodes)"
	@echo "make cluster-down           stop exactly that cluster"
	@echo "make mlflow-ui   browse the MLflow runs and model registry (http://127.0.0.1:$(MLFLOW_PORT))"

setup: $(STAMP) data-package

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || { echo "creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@echo "installing dltrain and its pinned dependencies into $(VENV) (first time: about 3 minutes)"
	@$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $@

# Debian's package is the offline mirror of Fashion-MNIST (machines without internet, CI).
data-package:
	@if [ ! -d $(FMNIST_DIR) ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's dataset-fashion-mnist into $(FMNIST_DIR)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	  else \
	    echo "note: $(FMNIST_DIR) is missing and apt-get is not usable here; download will use the public mirrors"; \
	  fi; \
	fi

# The run ends with dltrain's summary, not with DVC's advice to `git add` and `dvc push`: those
# lines (and blank ones) are dropped from DVC's stdout; its errors, on stderr, are not. The
# filter ignores Ctrl-C, so that it passes on what DVC prints while it stops; the run fails as
# DVC does, and then prints no summary.
DVC_HINTS := ^([[:space:]]*|To track the changes with git.*|To enable auto staging.*|[[:space:]]+git add .*|[[:space:]]+dvc config core.autostage.*|Use `dvc push`.*)$$
run: setup
	@start=$$(date +%s); set -o pipefail; \
	  dvc repro | { trap '' INT; grep --line-buffered -v -E '$(DVC_HINTS)' || true; } && \
	  echo && dltrain summary --since $$start

test: setup
	@pytest $(PYTEST_ARGS)

# The inner loop: every test without the integration or e2e marker (those start Ray, a server
# or a `dvc repro`/`dltrain` subprocess pipeline).
QUICK := not integration and not e2e
test-quick: setup
	@pytest -m "$(QUICK)" $(PYTEST_ARGS)

lint: setup
	@ruff check . && lint-imports && deptry .

# The local Prefect stack (infra/prefect/): server + process worker in the background, and the
# warm Ray head that the worker's train runs reuse.
stack-up: setup ray-up
	@python infra/prefect/stack.py up

stack-down: ray-down
	@$(BIN)/python infra/prefect/stack.py down

# `deploy` is what a laptop needs; the weekly cluster schedule only when asked, from the clone
# on the Ray head node (deployed elsewhere it would queue runs that no worker takes).
deploy: setup
	@infra/prefect/deploy.sh local

deploy-cluster: setup
	@infra/prefect/deploy.sh cluster

# The embedded MLflow store that `dltrain register` writes (git-ignored mlruns/), served on
# localhost only. Runs keep the artifact location they were logged with (mlruns/artifacts).
MLFLOW_PORT ?= 5000
# One web worker and no job-execution consumers (MLflow's background jobs serve its GenAI
# features): on a laptop they only slow the first answer (~80 s with the defaults on 2 cores)
# and Ctrl-C.
mlflow-ui: setup
	@mkdir -p mlruns/artifacts
	@echo "MLflow UI: http://127.0.0.1:$(MLFLOW_PORT) (Ctrl-C to stop)"
	@MLFLOW_LOGGING_LEVEL=WARNING MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
	  mlflow ui --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1 \
	  --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db \
	  --default-artifact-root $(CURDIR)/mlruns/artifacts

# A real multi-node Ray cluster on this machine (infra/local-cluster/): a head and $(WORKERS)
# worker nodes, each its own `ray start` with its own CPUs. State: .cluster/ (or env DLTRAIN_CLUSTER_DIR).
WORKERS ?= 1
HEAD_CPUS ?= 1
WORKER_CPUS ?= 1
cluster-up: setup
	@python infra/local-cluster/cluster.py up --workers $(WORKERS) --head-cpus $(HEAD_CPUS) \
	  --worker-cpus $(WORKER_CPUS)

cluster-down:
	@$(BIN)/python infra/local-cluster/cluster.py down

# The workspace's warm Ray: one head on loopback with all of this machine's CPUs (and the GPUs
# Ray finds), no dashboard, token auth; `dltrain train` (train.ray_address: auto) reuses it
# instead of starting a Ray per run. State: .ray/ (or env DLTRAIN_RAY_DIR), with env holding
# the export lines for a client. It needs the venv only, not the data set. (nproc would count
# OMP_NUM_THREADS, not CPUs, when that is set.)
RAY_DIR := $(abspath $(or $(DLTRAIN_RAY_DIR),.ray))
ray-up: $(STAMP)
	@line=$$(python infra/local-cluster/cluster.py --state-dir $(RAY_DIR) up --workers 0 \
	  --head-cpus $$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) --head-gpus auto --no-dashboard --brief) && \
	  echo "$$line; dltrain train reuses it (train.ray_address: auto); stop it with make ray-down"

ray-down:
	@$(BIN)/python infra/local-cluster/cluster.py --state-dir $(RAY_DIR) down
