# make demo: set up a virtual environment (the core and the plot extra) and run the pipeline on
#            sample_data/ (figures in demo_out/)
# make test: set up with every extra and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SAMPLE := sample_data/multi30k-sample.h5
OUT := demo_out

.PHONY: setup demo test lint bench clean

# One venv, two stamps: the demo installs only what it runs (the core and matplotlib), the test suite
# every extra (CI runs their tests); `make test` after `make demo` upgrades the venv to all extras.
$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	touch $@

$(VENV)/.demo: pyproject.toml $(VENV)/.created
	$(BIN)/python -m pip install --quiet -e '.[plot]'
	touch $@

# kiez, the peer of tests/test_peer_kiez.py, goes in without its dependencies: its metadata pins
# numpy<2 and pandas<2, which the parts used there do not need (what they import is in the test extra).
$(VENV)/.all: pyproject.toml examples/qbnorm-softened-is/pyproject.toml $(VENV)/.created
	$(BIN)/python -m pip install --quiet -e '.[test,plot,faiss,lancedb,dask,arrow,safetensors,remote]'
	$(BIN)/python -m pip install --quiet --no-deps -e examples/qbnorm-softened-is  # the example plug-in (tests/test_plugins.py)
	$(BIN)/python -m pip install --quiet --no-deps kiez==0.5.0 class-resolver==0.8.2
	touch $@ $(VENV)/.demo

setup: $(VENV)/.all

demo: $(VENV)/.demo
	rm -rf $(OUT) && mkdir -p $(OUT)
	$(BIN)/qbnorm build-bank $(SAMPLE)::/train_queries -o $(OUT)/bank.h5 --strategy all
	$(BIN)/qbnorm probe --bank $(OUT)/bank.h5 --gallery $(SAMPLE)::/gallery -o $(OUT)/probe.h5 --beta 20 --k 1
	$(BIN)/qbnorm normalise --queries $(SAMPLE)::/queries --gallery $(SAMPLE)::/gallery \
		--probe $(OUT)/probe.h5 --method none -o $(OUT)/raw.h5
	$(BIN)/qbnorm normalise --queries $(SAMPLE)::/queries --gallery $(SAMPLE)::/gallery \
		--probe $(OUT)/probe.h5 --method dis -o $(OUT)/dis.h5
	$(BIN)/qbnorm evaluate $(OUT)/raw.h5 $(OUT)/dis.h5 --gt $(SAMPLE)::/gt --plot $(OUT)/recall.png
	$(BIN)/qbnorm evaluate $(OUT)/raw.h5 --queries-per-item 5 --direction v2t
	$(BIN)/qbnorm hubness $(OUT)/raw.h5 $(OUT)/dis.h5 --k 10 --plot $(OUT)/hubness.png

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check qbnorm_cli tests benchmarks

bench: setup
	$(BIN)/python -m benchmarks --quick

clean:
	rm -rf $(OUT) $(VENV) .pytest_cache .ruff_cache
