# Kiln make targets. `make run` and `make test` are the README's two quickstart commands;
# both create the virtualenv first if it is missing.
PY ?= .venv/bin/python
PRESET ?= tiny
# The offline data kit beside the repo; used only when KILN_DATA_MIRROR is not already set.
MIRROR ?= $(abspath ../shared/data)
export KILN_DATA_MIRROR ?= $(if $(wildcard $(MIRROR)/pretrain),$(MIRROR),)

.PHONY: install run test bench clean

.venv/.installed: pyproject.toml constraints.txt
	python3 -m venv .venv
	.venv/bin/pip install -q torch==2.13.0
	.venv/bin/pip install -q -c constraints.txt -e ".[dev]"
	touch $@

install: .venv/.installed

# The whole pipeline (download -> ... -> report) on the tiny preset, in this process.
run: .venv/.installed
	$(PY) -m llm.cli run --preset $(PRESET)

test: .venv/.installed
	$(PY) -m pytest -q

# The benches also run the reference implementations (datatrove, whose English word tokenizer needs
# spaCy): the `bench` extra, installed on top of the dev environment the first time.
.venv/.bench-installed: .venv/.installed pyproject.toml constraints.txt
	.venv/bin/pip install -q -c constraints.txt -e ".[dev,bench]"
	touch $@

bench: .venv/.bench-installed
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

include deployments/stack.mk

clean:
	rm -rf artifacts .kiln mlruns .stack
