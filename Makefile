# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.installed-stamp
OUT    ?= out

.PHONY: all install demo test bench clean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned first so that no later requirement can pull a CUDA build from the registry.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[models,slicer,dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/spinekit demo --out $(OUT)/demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider Testing

bench: $(STAMP)
	$(PY) -m spinekit.bench

clean:
	rm -rf $(OUT) build *.egg-info
