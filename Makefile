# Everything a fresh machine needs: `make test` (and later `make serve`) create the venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

.PHONY: venv test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[test]" "$(TORCH_PIN)"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check service tests bench

bench: venv
	$(PY) bench/adapter_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache

.PHONY: serve
serve: venv
	$(PY) -m service serve

.PHONY: ablation
ablation: venv
	$(PY) bench/ablation.py --parts methods internals cost --seeds 0 1 2 --steps 400 --batch-size 16 --lr 0.01
	$(PY) bench/ablation.py --parts targets --seeds 0 1 --steps 400 --batch-size 16 --lr 0.003
	$(PY) bench/ablation.py --parts vce --seeds 0 1 --batch-size 16 --language-steps 200 --inspection-steps 300 --inspection-lr 0.01
	$(PY) bench/ablation.py --report

.PHONY: demo
demo: venv
	$(PY) -m service.demo.story
