# The two commands of a fresh machine: `make demo` and `make test` (both set themselves up).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= outputs/demo

.PHONY: test demo bench clean-demo

$(VENV)/installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: $(VENV)/installed
	$(PY) -m pytest -q

demo: $(VENV)/installed
	$(PY) -m benchmarks.demo --out $(DEMO)

bench: $(VENV)/installed
	$(PY) -m benchmarks.run_all

clean-demo:
	rm -rf $(DEMO)
