# Set-up and everyday commands. Everything installs from the package index only (offline-first).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "transferlab needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	@# torch's CUDA build pulls several GB of wheels; a download cut off mid-way (seen on CI: stuck at
	@# 99.6 of 228 MB through pip's own resumes) gets the whole install tried again, from pip's cache.
	for attempt in 1 2 3 4; do \
	  $(BIN)/pip install --quiet --upgrade pip && \
	  $(BIN)/pip install --quiet --resume-retries 10 -e '.[test]' && break; \
	  [ $$attempt -lt 4 ] || exit 1; \
	  echo "pip install failed (attempt $$attempt of 4); trying again in 20 s"; sleep 20; \
	done
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
