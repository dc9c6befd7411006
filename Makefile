# Set-up and everyday commands. Everything installs from the package index only (offline-first).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "transferlab needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)   ## the main job: EfficientNet-Lite0 (offline weights) on scikit-learn's digits
	$(BIN)/transferlab demo

test: $(STAMP)   ## the test suite (tiny generated models and images; no network)
	$(BIN)/python -m pytest -q

bench: $(STAMP)  ## time-to-accuracy against the classic loop (needs ../shared/data/hymenoptera_data)
	$(BIN)/python bench/time_to_accuracy.py

clean:
	rm -rf $(VENV) .pytest_cache
