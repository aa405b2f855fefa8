# The two commands: `make demo` and `make test` (`make test-fast`: its unit tier). Each creates
# .venv when it is missing and installs the pinned requirements it needs first.
PYTHON ?= python3
VENV := .venv
INSTALLED := $(VENV)/.installed
TPU_COMPILE_INSTALLED := $(VENV)/.tpu-compile-installed
WEIGHTS_TEST_INSTALLED := $(VENV)/.weights-test-installed
BENCHMARKS_INSTALLED := $(VENV)/.benchmarks-installed
TEST_INSTALLED := $(VENV)/.test-installed
BEAM_INSTALLED := $(VENV)/.beam-installed
DOCS_INSTALLED := $(VENV)/.docs-installed
DEMO_WORKDIR ?= workdirs/demo

.PHONY: demo test test-fast docs docs-serve install install-gpu install-tf install-tpu-compile \
	install-weights-test install-benchmarks install-test install-beam install-docs \
	pre-pretraining-sweep clean-demo

install: $(INSTALLED)

$(INSTALLED): requirements.txt setup.py
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt
	$(VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $(INSTALLED)

# On a GPU host: the same, plus the CUDA build of the pinned jax, for the CUDA version
# (12 or 13) that the host's driver runs (launch/cuda_jax_extra.sh; CUDA=cuda12 to choose).
# Then `make demo`, `make test` and `python main.py ...` run on the GPUs.
install-gpu: $(INSTALLED)
	cuda="$${CUDA:-$$(launch/cuda_jax_extra.sh)}" && \
	  $(VENV)/bin/python -m pip install --quiet "jax[$$cuda]==$$(sed -n 's/^jax==//p' requirements.txt)"
	$(VENV)/bin/python -c 'import jax; print(jax.default_backend(), jax.devices())'

# The TPU compiler (libtpu), to compile a run for a Cloud TPU slice on this machine:
# main.py --compile_for=v5p-256. The tests need it; `make demo` does not.
install-tpu-compile: $(TPU_COMPILE_INSTALLED)

$(TPU_COMPILE_INSTALLED): $(INSTALLED) requirements-tpu-compile.txt
	$(VENV)/bin/python -m pip install --quiet -r requirements-tpu-compile.txt
	touch $(TPU_COMPILE_INSTALLED)

# torch, timm and transformers, which the weights' parity tests load our exports in (and
# which importing a .pth needs torch of). The tests need them; `make demo` does not.
install-weights-test: $(WEIGHTS_TEST_INSTALLED)

$(WEIGHTS_TEST_INSTALLED): $(INSTALLED) requirements-weights-test.txt
	$(VENV)/bin/python -m pip install --quiet -r requirements-weights-test.txt
	touch $(WEIGHTS_TEST_INSTALLED)

# matplotlib, for the benchmarks' plots. The tests need it (they run the MAE -> WSP
# benchmark's small mode, plots included); `make demo` does not.
install-benchmarks: $(BENCHMARKS_INSTALLED)

$(BENCHMARKS_INSTALLED): $(INSTALLED) requirements-benchmarks.txt
	$(VENV)/bin/python -m pip install --quiet -r requirements-benchmarks.txt
	touch $(BENCHMARKS_INSTALLED)

# The MAWS claim over seeds and budgets (benchmarks/pre_pretraining.py): 1 h 15 min on 2 CPU
# cores; each run is a workdir, so running it again continues where it stopped.
pre-pretraining-sweep: $(BENCHMARKS_INSTALLED)
	$(VENV)/bin/python benchmarks/pre_pretraining.py --processes=2

# Apache Beam and imagehash: data preparation as a Beam pipeline (--runner=DirectRunner here,
# Dataflow / Flink / Spark at scale) and near-duplicate removal (--dedup_against). The tests
# need them; `make demo` does not (without --runner the commands run in process).
install-beam: $(BEAM_INSTALLED)

$(BEAM_INSTALLED): $(INSTALLED) requirements-beam.txt
	$(VENV)/bin/python -m pip install --quiet -r requirements-beam.txt
	touch $(BEAM_INSTALLED)

# mkdocs and its Material theme: the documentation site (docs/, mkdocs.yml). The tests build it
# strictly (tests/test_docs.py); `make demo` does not need it.
install-docs: $(DOCS_INSTALLED)

$(DOCS_INSTALLED): $(INSTALLED) requirements-docs.txt
	$(VENV)/bin/python -m pip install --quiet -r requirements-docs.txt
	touch $(DOCS_INSTALLED)

# The site, built into site/ (strict: a broken link or a page missing from mkdocs.yml's nav
# stops it), or served with live reload at http://127.0.0.1:8000.
docs: $(DOCS_INSTALLED)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/python -m mkdocs build --strict

docs-serve: $(DOCS_INSTALLED)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/python -m mkdocs serve

# pytest and pytest-xdist: the tests' runner, which `make demo` does not need.
install-test: $(TEST_INSTALLED)

$(TEST_INSTALLED): $(INSTALLED) requirements-test.txt
	$(VENV)/bin/python -m pip install --quiet -r requirements-test.txt
	touch $(TEST_INSTALLED)

# TensorFlow, only to prepare TFDS datasets and for benchmarks/input_speed.py's tf.data rows:
# training, data reading and logging never import it.
install-tf: $(INSTALLED)
	$(VENV)/bin/python -m pip install --quiet -r requirements-tf.txt

# MAE -> WSP on the embedded synthetic data, CPU-sized. Run it again to resume (or to
# see that it is finished); `make clean-demo` starts over.
demo: $(INSTALLED)
	$(VENV)/bin/python main.py --config=configs/mae_then_wsp.py:demo --workdir=$(DEMO_WORKDIR)

# Three pytest-xdist workers, one test file each at a time: more workers than the
# 2 cores CI has, because the multi-process tests' parents wait on their children
# and checkpoint saves wait on threads (8:52 vs 9:17 with two, 15:32 with none).
test: $(INSTALLED) $(TEST_INSTALLED) $(TPU_COMPILE_INSTALLED) $(WEIGHTS_TEST_INSTALLED) \
	$(BENCHMARKS_INSTALLED) $(BEAM_INSTALLED) $(DOCS_INSTALLED)
	$(VENV)/bin/python -m pytest -q -n 3 --dist loadfile tests

# The unit tier alone (pytest.ini names the tiers): every test not marked integration,
# multiprocess, interop (torch), tpu_compile (libtpu), beam or benchmarks (matplotlib), about
# 1.5 min on 2 CPU cores. It installs only requirements.txt and requirements-test.txt; one tier
# of the rest: `.venv/bin/python -m pytest -m interop tests` after its install-* target.
test-fast: $(INSTALLED) $(TEST_INSTALLED)
	$(VENV)/bin/python -m pytest -q -n 3 --dist loadfile -m unit tests

clean-demo:
	rm -rf $(DEMO_WORKDIR)
