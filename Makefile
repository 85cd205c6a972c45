# `make demo` and `make test` each build .venv on first use, so a fresh machine needs nothing else.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
# The demo's port: `make demo PORT=8080` (or PORT in the environment) when 8000 is taken.
PORT   ?= 8000

.PHONY: venv demo test lint bench bench-engine bench-deflate bench-plans bench-throughput bench-ranges bench-cold bench-remote bench-scaling bench-asgi clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# -b on the command line replaces gunicorn.conf.py's bind (it is not added to it).
demo: $(STAMP)
	cd examples && ../$(BIN)/gunicorn -c gunicorn.conf.py -b 127.0.0.1:$(PORT) flask_app:app

test: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# The engine's figures against the targets (README, Benchmarks): a few minutes in all.
bench: bench-engine bench-deflate bench-plans

bench-engine: $(STAMP)
	$(BIN)/python bench/engine_speed.py

bench-deflate: $(STAMP)
	$(BIN)/python bench/deflate_speed.py

bench-plans: $(STAMP)
	$(BIN)/python bench/plan_scale.py

bench-throughput: $(STAMP)
	$(BIN)/python bench/zip_throughput.py

bench-ranges: $(STAMP)
	$(BIN)/python bench/range_resume.py

bench-cold: $(STAMP)
	$(BIN)/python bench/cold_ranges.py

# Remote entries behind a 50 ms origin (nginx + the tests' proxy), prefetch 0-8 under gunicorn: about 2.5 minutes.
bench-remote: $(STAMP)
	$(BIN)/python bench/remote_sources.py

# S3 folders as ZIPs from moto, ranges with a warm and a cold CRC-32 store, SQLite against PostgreSQL
# as the store, under gunicorn: about 2 minutes.
bench-scaling: $(STAMP)
	$(BIN)/python bench/scaling_out.py

# The ASGI middleware under uvicorn against Starlette's FileResponse: a direct file and a stored ZIP of
# 4 x 256 MB, the CRC-32 store warm and cold: about 1 minute.
bench-asgi: $(STAMP)
	$(BIN)/python bench/asgi_speed.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
