# Two commands for a fresh machine: `make run` serves the demo model, `make test` checks it all.
# Both are idempotent: the virtual environment and the demo model are made once and reused.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# cpu: tensorflow-cpu. On a GPU machine: make run EXTRAS=gpu,train,dev
EXTRAS ?= cpu,train,dev
DEMO_MODEL := models/shapes
PORT ?= 8080

.PHONY: install run test lint bench audit demo-model screenshot docs clean

# The stamp depends on pyproject.toml, so a changed dependency list reinstalls.
$(BIN)/.installed-$(EXTRAS): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

install: $(BIN)/.installed-$(EXTRAS)

# Train the demo model on the built-in synthetic shapes dataset, unless one exists.
demo-model: install
	@if ls -d $(DEMO_MODEL)/[0-9]* >/dev/null 2>&1; then \
		echo "demo model: using $(DEMO_MODEL) (delete it to retrain)"; \
	else \
		$(BIN)/python -m training --synthetic shapes --out models --name shapes; \
	fi

run: demo-model
	@echo "Serving $(DEMO_MODEL) on http://localhost:$(PORT): open it in a browser, or try, in another terminal:"
	@echo "  curl -fsS http://localhost:$(PORT)/readyz"
	@echo "  curl -F image=@examples/circle.png http://localhost:$(PORT)/predict"
	@echo "  curl --data-binary @examples/circle.png -H 'Content-Type: image/png' http://localhost:$(PORT)/predict"
	@echo "  curl -s http://localhost:$(PORT)/metrics | grep cnn_"
	$(BIN)/cnn-serve --model-dir $(DEMO_MODEL) --port $(PORT)

# Load benchmark (issue-free loopback only): needs wrk and h2load (apt-get install wrk
# nghttp2-client); bench/peer.py makes its own venv for BentoML (a network install, once).
bench: install
	$(BIN)/python bench/run.py
	$(BIN)/python bench/split.py
	$(BIN)/python bench/grpc_vs_rest.py
	$(BIN)/python bench/explain.py
	$(BIN)/python bench/peer.py

# Known-vulnerability audit of the installed dependencies; needs the PyPI JSON API or OSV,
# which the development and CI machines cannot reach.
audit: install
	$(BIN)/python -m pip install --quiet pip-audit
	$(BIN)/pip-audit --skip-editable

# docs/page.png, the README's picture of the page at /, taken again by the browser test that
# uploads three images (Debian's chromium, as in CI), so that it shows the page as it is.
screenshot: install
	PAGE_SCREENSHOT=docs/page.png $(BIN)/python -m pytest -q tests/test_page.py -k three_uploaded

# The docs site (mkdocs.yml, docs/) at http://127.0.0.1:8000, rebuilt on every save; the tests
# build it with --strict (tests/test_docs.py).
docs: install
	$(BIN)/mkdocs serve

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
