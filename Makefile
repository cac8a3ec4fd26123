# Everything the project needs is installed from here: `make run` and `make test` work on a
# fresh machine with only Python 3.11 and git.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.klviewer-installed

.PHONY: run test venv bench fuzz clean data data-pycerr data-invesalius

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/klviewer gui

test: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_radon.py

# 10,000 hostile inputs of every kind, each in a child process with time and memory limits
# (about an hour on 2 cores); the table goes to benchmarks/results/fuzz.md. make test runs 300.
FUZZ_INPUTS ?= 10000
fuzz: $(STAMP)
	$(BIN)/python benchmarks/fuzz.py -n $(FUZZ_INPUTS) --seed 17 --jobs 2 --out benchmarks/results/fuzz.md

# Real CT for tests and benchmarks (docs/real_ct_data.md). It goes to a git-ignored folder and is
# never committed: the pycerr data is CC BY-NC 3.0 (tests and benchmarks only), InVesalius' GPL-2.
REALCT_DIR ?= $(or $(KLVIEWER_DATA_DIR),data/realct)
PYCERR_WHEEL := pycerr-2.5.1-py3-none-any.whl
PYCERR_REQUIREMENT := pycerr==2.5.1 --hash=sha256:5c3e82cc387538c5c38143827314fc2aa743ef886e8518f7f52beff6805c635d

data: data-pycerr data-invesalius
	$(BIN)/python -m klviewer.io.realct --root $(REALCT_DIR) list

data-pycerr: $(STAMP)
	@mkdir -p $(REALCT_DIR)/downloads
	echo '$(PYCERR_REQUIREMENT)' > $(REALCT_DIR)/downloads/pycerr-requirement.txt
	$(BIN)/python -m pip download --quiet --no-deps --require-hashes -r $(REALCT_DIR)/downloads/pycerr-requirement.txt -d $(REALCT_DIR)/downloads
	$(BIN)/python -m klviewer.io.realct --root $(REALCT_DIR) unpack-pycerr $(REALCT_DIR)/downloads/$(PYCERR_WHEEL)

# Debian/Ubuntu only: apt-get download needs no root, dpkg-deb -x unpacks into a temporary folder.
data-invesalius: $(STAMP)
	@mkdir -p $(REALCT_DIR)
	tmp=$$(mktemp -d) && \
	{ (cd $$tmp && apt-get download invesalius-examples && dpkg-deb -x invesalius-examples_*.deb root) \
	  || { echo "apt-get download invesalius-examples failed (Debian/Ubuntu only; run apt-get update first?)"; rm -rf $$tmp; exit 1; }; } && \
	$(BIN)/python -m klviewer.io.realct --root $(REALCT_DIR) install-invesalius $$tmp/root; \
	status=$$?; rm -rf $$tmp; exit $$status

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
