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

.PHONY: run test venv bench wheel bundle bundle-smoke clean

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

bench: $(APP_STAMP)
	$(BIN)/python benchmarks/bench_radon.py

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
