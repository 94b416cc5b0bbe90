# Kiln make targets. `make run` and `make test` are the README's quickstart.
PY ?= .venv/bin/python
PRESET ?= tiny
MIRROR ?= $(abspath ../shared/data)

.PHONY: install run test bench demo stack-up stack-down stack-status clean

install:
	python3 -m venv .venv
	.venv/bin/pip install torch==2.13.0
	.venv/bin/pip install -c constraints.txt -e ".[dev]"

# The whole pipeline on the tiny preset, on local defaults (offline mirror when present).
run:
	KILN_DATA_MIRROR=$${KILN_DATA_MIRROR:-$(MIRROR)} $(PY) -m llm.cli run --preset $(PRESET)

test:
	KILN_DATA_MIRROR=$${KILN_DATA_MIRROR:-$(MIRROR)} $(PY) -m pytest -q

clean:
	rm -rf artifacts .kiln mlruns
