# Kiln's local stack and demo (included from the Makefile).
#   make stack-up      Prefect server + MLflow server + cpu/gpu workers on 127.0.0.1, all deployments
#   make demo          stack-up, then full-pipeline/tiny end to end, then where to look
#   make stack-status  health of each process;  make stack-down  stop them
STACK_HOME ?= .stack
STACK_ARGS ?=
DEMO_PRESET ?= tiny
PREFECT_BIN ?= $(dir $(PY))prefect

.PHONY: stack-up stack-down stack-status demo screenshots

stack-up:
	KILN_DATA_MIRROR=$${KILN_DATA_MIRROR:-$(MIRROR)} $(PY) -m llm.cli stack up --home $(STACK_HOME) $(STACK_ARGS)

stack-down:
	$(PY) -m llm.cli stack down --home $(STACK_HOME)

stack-status:
	$(PY) -m llm.cli stack status --home $(STACK_HOME)

demo:
	@$(PY) -m llm.cli stack status --home $(STACK_HOME) >/dev/null 2>&1 || $(MAKE) --no-print-directory stack-up
	. $(STACK_HOME)/env && $(PREFECT_BIN) deployment run full-pipeline/$(DEMO_PRESET) --watch
	@. $(STACK_HOME)/env && echo "" && echo "Where to look:" \
	 && echo "  Prefect UI (flow-run graph, artifacts: kiln-report, kiln-mlflow-run)  $${PREFECT_UI_URL}/runs" \
	 && echo "  MLflow UI (experiment kiln: one parent run per pipeline run, a child per stage)  $${MLFLOW_TRACKING_URI}" \
	 && echo "  Report    artifacts/report/<key>/report.md  (newest: ls -td artifacts/report/*/ | head -1)" \
	 && echo "  Logs      $(STACK_HOME)/logs/"

screenshots:
	. $(STACK_HOME)/env && $(PY) scripts/ui_screenshots.py --out docs/screenshots
