# flowjac: two commands do everything.
#   make book   create .venv, execute every chapter (PROFILE=quick|full), build _build/html
#   make test   create .venv, run unit tests, nbval, the sync check, a golden render
#               and the browser check of its pages (installs chromium by apt if missing)
#   make test-changed  the same, re-executing only chapters whose inputs changed
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PROFILE ?= quick
DEVICE ?=
PARAMS ?=
PARAM_FLAGS = $(foreach p,$(PARAMS),--param $(p))
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: book test test-changed golden venv chapter clean browser pair

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(VENV)/bin/python -m pip install -q -r requirements.txt 2>&1 | grep -v "is ignored" || true
	$(VENV)/bin/python -m pip install -q --no-deps torchcfm==1.0.7 2>&1 | grep -v "is ignored" || true
	$(VENV)/bin/python -m pip install -q --no-deps -e . 2>&1 | grep -v "is ignored" || true
	$(VENV)/bin/python -c "import torch, torchvision, flowjac, jupyter_book, nbval, causallearn, mlxtend, torchcfm.models.unet, flow_matching.solver, torchdiffeq, selenium"
	touch $@

venv: $(VENV)/.installed

book: venv
	$(VENV)/bin/python tools/build_book.py book --profile $(PROFILE) $(if $(DEVICE),--device $(DEVICE)) $(PARAM_FLAGS)

# One chapter only, e.g. `make chapter CH=gaussian PROFILE=full`;
# PARAMS sets chapter parameters, e.g. PARAMS="arch=unet flow_steps=2000".
chapter: venv
	$(VENV)/bin/python tools/build_book.py book --profile $(PROFILE) --only $(CH) $(if $(DEVICE),--device $(DEVICE)) $(PARAM_FLAGS)

# Two xdist workers with one torch thread each (the 2-core CI machine);
# chapters first, since they are the longest items (--dist loadfile keeps
# each chapter's cells on one worker); the 25 slowest items are printed.
PYTEST_RUN = OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VENV)/bin/python -m pytest notebooks tests \
	--nbval-lax -p no:cacheprovider -n 2 --dist loadfile --durations=25

test: venv browser
	$(VENV)/bin/ruff check flowjac tests tools benchmarks conftest.py
	$(PYTEST_RUN)

# The development loop: the same, but chapters whose inputs have not changed
# since they last passed here are not re-executed (tools/chapter_inputs.py;
# the header says which chapters run and why).
test-changed: venv browser
	$(VENV)/bin/ruff check flowjac tests tools benchmarks conftest.py
	$(PYTEST_RUN) --changed-only

# Headless Chromium for tests/test_browser.py (Debian packages; as root, or
# through sudo), with the DejaVu fonts its layout is measured in. Skipped
# when all three are already there.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
BROWSER_PKGS := chromium chromium-driver fonts-dejavu-core
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 && \
	    test -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf; then :; else \
	  echo "installing $(BROWSER_PKGS) (apt-get)"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    $(BROWSER_PKGS) >/dev/null || \
	  { echo "could not install $(BROWSER_PKGS): the browser test needs them"; exit 1; }; fi

# After a prose-only edit of book/<chapter>.md: carry its markdown cells into
# the golden notebook, keeping the outputs (no re-execution); CH=one chapter.
pair: venv
	$(VENV)/bin/python tools/build_book.py pair $(if $(CH),--only $(CH))

golden: venv
	$(VENV)/bin/python tools/build_book.py golden $(if $(CH),--only $(CH))

clean:
	rm -rf _build
