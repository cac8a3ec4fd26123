# Everything the project needs is installed from here: `make run` and `make test` work on a
# fresh machine with only Python 3.11 and git.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.klviewer-installed

.PHONY: run test venv bench clean data data-pycerr data-invesalius screenshots

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

# The app in a real X window at both screen sizes with fresh settings (tests/test_app_real_window.py checks
# the same with a tiny prior). Needs Xvfb: apt-get install xvfb libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1
screenshots: $(STAMP)
	for size in 1366x768 1920x1080; do \
	  QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 $${size}x24" $(BIN)/python -m klviewer.app.screen_check --out docs/screenshots || exit 1; \
	done

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_radon.py

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
