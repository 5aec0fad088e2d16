# make demo  - set up and run the demo (no Redis, no database server needed)
# make test  - set up and run the whole test suite (needs Redis and PostgreSQL running)
# make lint  - ruff
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: demo test lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/orchard demo

# one test file per process, a process per core and one more (at most 4: each
# integration test runs its own workers; tests/conftest.py says why one more);
# `$(BIN)/pytest tests/...` runs a part in one process
test: $(BIN)/.installed
	@# bytecode written once: where PYTHONDONTWRITEBYTECODE is set, each of the many
	@# worker processes the suite starts would compile orchard's modules again
	$(BIN)/python -m compileall -q shared db workers scheduler > /dev/null
	$(BIN)/pytest --numprocesses auto --maxprocesses 4 --dist loadfile

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .orchard .pytest_cache
