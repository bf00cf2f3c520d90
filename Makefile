# flowjac: two commands do everything.
#   make book   create .venv, execute every chapter (PROFILE=quick|full), build _build/html
#   make test   create .venv, run unit tests, nbval, the sync check and a golden render
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PROFILE ?= quick
DEVICE ?=
PARAMS ?=
PARAM_FLAGS = $(foreach p,$(PARAMS),--param $(p))
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: book test golden venv chapter clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(VENV)/bin/python -m pip install -q -r requirements.txt 2>&1 | grep -v "is ignored" || true
	$(VENV)/bin/python -m pip install -q --no-deps torchcfm==1.0.7 2>&1 | grep -v "is ignored" || true
	$(VENV)/bin/python -m pip install -q --no-deps -e . 2>&1 | grep -v "is ignored" || true
	$(VENV)/bin/python -c "import torch, torchvision, flowjac, jupyter_book, nbval, causallearn, mlxtend, torchcfm.models.unet, flow_matching.solver, torchdiffeq"
	touch $@

venv: $(VENV)/.installed

book: venv
	$(VENV)/bin/python tools/build_book.py book --profile $(PROFILE) $(if $(DEVICE),--device $(DEVICE)) $(PARAM_FLAGS)

# One chapter only, e.g. `make chapter CH=gaussian PROFILE=full`;
# PARAMS sets chapter parameters, e.g. PARAMS="arch=unet flow_steps=2000".
chapter: venv
	$(VENV)/bin/python tools/build_book.py book --profile $(PROFILE) --only $(CH) $(if $(DEVICE),--device $(DEVICE)) $(PARAM_FLAGS)

test: venv
	$(VENV)/bin/ruff check flowjac tests tools benchmarks
	$(VENV)/bin/python -m pytest tests notebooks --nbval-lax -p no:cacheprovider

golden: venv
	$(VENV)/bin/python tools/build_book.py golden $(if $(CH),--only $(CH))

clean:
	rm -rf _build
