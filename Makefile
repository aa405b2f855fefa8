# The two commands: `make demo` and `make test`. Both create .venv when it is
# missing and install the pinned requirements first.
PYTHON ?= python3
VENV := .venv
INSTALLED := $(VENV)/.installed
DEMO_WORKDIR ?= workdirs/demo

.PHONY: demo test install clean-demo

install: $(INSTALLED)

$(INSTALLED): requirements.txt setup.py
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt
	$(VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $(INSTALLED)

# MAE -> WSP on the embedded synthetic data, CPU-sized. Run it again to resume (or to
# see that it is finished); `make clean-demo` starts over.
demo: $(INSTALLED)
	TF_CPP_MIN_LOG_LEVEL=2 $(VENV)/bin/python main.py --config=configs/mae_then_wsp.py:demo --workdir=$(DEMO_WORKDIR)

test: $(INSTALLED)
	TF_CPP_MIN_LOG_LEVEL=2 $(VENV)/bin/python -m pytest -q tests

clean-demo:
	rm -rf $(DEMO_WORKDIR)
