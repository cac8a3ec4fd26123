# Everything the project needs is installed from here: `make run` and `make test` work on a
# fresh Debian/Ubuntu machine with only Python 3.11 (with venv), git and make. `make run`
# also needs Qt's X11 (xcb) runtime libraries: it installs them with apt when run as root,
# else it prints the exact apt-get command (packaging/check_qt_runtime.py).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The app alone (make run) and the app plus the dev extras (make test) have their own stamps.
APP_STAMP := $(VENV)/.klviewer-installed
DEV_STAMP := $(VENV)/.klviewer-dev-installed
BUNDLE_STAMP := $(VENV)/.klviewer-bundle-installed
# Extra arguments for `klviewer gui`, e.g. make run ARGS="--analyze --screenshot x.png --quit".
ARGS ?=

.PHONY: run test venv bench fuzz wheel bundle bundle-smoke clean data data-pycerr data-invesalius screenshots

$(APP_STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	@touch $(APP_STAMP)

$(DEV_STAMP): $(APP_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(DEV_STAMP)

$(BUNDLE_STAMP): $(APP_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bundle]'
	@touch $(BUNDLE_STAMP)

venv: $(DEV_STAMP)

run: $(APP_STAMP)
	$(BIN)/python packaging/check_qt_runtime.py
	$(BIN)/klviewer gui $(ARGS)

# Tests run with Qt's offscreen platform: they need Qt's GUI libraries (EGL, fontconfig, glib),
# none of the xcb ones.
test: $(DEV_STAMP)
	$(BIN)/python packaging/check_qt_runtime.py --platform offscreen
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m pytest -q

# The app in a real X window at both screen sizes with fresh settings (tests/test_app_real_window.py checks
# the same with a tiny prior). Needs Xvfb: apt-get install xvfb libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1
screenshots: $(DEV_STAMP)
	for size in 1366x768 1920x1080; do \
	  QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 $${size}x24" $(BIN)/python -m klviewer.app.screen_check --out docs/screenshots || exit 1; \
	done

bench: $(APP_STAMP)
	$(BIN)/python benchmarks/bench_radon.py

# 10,000 hostile inputs of every kind, each in a child process with time and memory limits
# (about an hour on 2 cores); the table goes to benchmarks/results/fuzz.md. make test runs 300.
FUZZ_INPUTS ?= 10000
fuzz: $(DEV_STAMP)
	$(BIN)/python benchmarks/fuzz.py -n $(FUZZ_INPUTS) --seed 17 --jobs 2 --out benchmarks/results/fuzz.md

# Real CT for tests and benchmarks (docs/real_ct_data.md). It goes to a git-ignored folder and is
# never committed: the pycerr data is CC BY-NC 3.0 (tests and benchmarks only), InVesalius' GPL-2.
REALCT_DIR ?= $(or $(KLVIEWER_DATA_DIR),data/realct)
PYCERR_WHEEL := pycerr-2.5.1-py3-none-any.whl
PYCERR_REQUIREMENT := pycerr==2.5.1 --hash=sha256:5c3e82cc387538c5c38143827314fc2aa743ef886e8518f7f52beff6805c635d

data: data-pycerr data-invesalius
	$(BIN)/python -m klviewer.io.realct --root $(REALCT_DIR) list

data-pycerr: $(DEV_STAMP)
	@mkdir -p $(REALCT_DIR)/downloads
	echo '$(PYCERR_REQUIREMENT)' > $(REALCT_DIR)/downloads/pycerr-requirement.txt
	$(BIN)/python -m pip download --quiet --no-deps --require-hashes -r $(REALCT_DIR)/downloads/pycerr-requirement.txt -d $(REALCT_DIR)/downloads
	$(BIN)/python -m klviewer.io.realct --root $(REALCT_DIR) unpack-pycerr $(REALCT_DIR)/downloads/$(PYCERR_WHEEL)

# Debian/Ubuntu only: apt-get download needs no root, dpkg-deb -x unpacks into a temporary folder.
data-invesalius: $(DEV_STAMP)
	@mkdir -p $(REALCT_DIR)
	tmp=$$(mktemp -d) && \
	{ (cd $$tmp && apt-get download invesalius-examples && dpkg-deb -x invesalius-examples_*.deb root) \
	  || { echo "apt-get download invesalius-examples failed (Debian/Ubuntu only; run apt-get update first?)"; rm -rf $$tmp; exit 1; }; } && \
	$(BIN)/python -m klviewer.io.realct --root $(REALCT_DIR) install-invesalius $$tmp/root; \
	status=$$?; rm -rf $$tmp; exit $$status

# The wheel (with the shipped prior inside), into dist/. setuptools would pack whatever an
# earlier build left in build/lib, so that goes first.
wheel: $(APP_STAMP)
	rm -rf build/lib build/bdist.*
	$(BIN)/python -m pip wheel --quiet --no-deps --wheel-dir dist .

# The PyInstaller one-folder desktop bundle: dist/klviewer/klviewer (packaging/README.md).
bundle: $(BUNDLE_STAMP)
	$(BIN)/python packaging/build_bundle.py

# Builds the bundle, then opens it headless, analyses the demo and saves a screenshot.
bundle-smoke: $(DEV_STAMP) $(BUNDLE_STAMP)
	KLVIEWER_BUNDLE_SMOKE=1 QT_QPA_PLATFORM=offscreen $(BIN)/python -m pytest -q tests/test_bundle_smoke.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
