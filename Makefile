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
	@# one thread per numerical library in each process (unless set): the processes
	@# already fill the cores, and OpenMP's and OpenBLAS's threads spin while they wait
	@# for one (the CNN and reliability tests used a third less CPU time on 2 cores)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} OPENBLAS_NUM_THREADS=$${OPENBLAS_NUM_THREADS:-1} \
		MKL_NUM_THREADS=$${MKL_NUM_THREADS:-1} \
		$(BIN)/pytest --numprocesses auto --maxprocesses 4 --dist loadfile

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .orchard .pytest_cache
