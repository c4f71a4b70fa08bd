# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
VENV := .venv
PY := $(VENV)/bin/python
# python3.12 may be a pyenv shim that refuses to run outside its version; fall back to pyenv's own copy.
PYTHON312 ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do \
	$$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && { echo $$p; break; }; done)

.PHONY: demo test setup clean

$(VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON312)" || { echo "error: python3.12 not found (megatron-core >= 0.17 needs Python 3.12)"; exit 1; }
	test -x $(PY) || $(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# The demo starts over each time: a run never writes into another run's checkpoints (the trainer refuses).
DEMO_RUN := runs/tiny_pretrain

demo: setup
	rm -rf $(DEMO_RUN)
	$(PY) examples/pretrain_bdgemma.py checkpoint.save=$(DEMO_RUN)
	$(PY) tools/plot_metrics.py $(DEMO_RUN)

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
