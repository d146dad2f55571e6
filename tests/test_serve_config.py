"""The Serve config file must validate against Ray's own schema and build our app."""
from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

from serving.serve.app import build
from serving.serve.config import SERVICERS, ServiceConfig

CONFIG = Path(__file__).resolve().parent.parent / "serving" / "serve" / "serve_config.yaml"


def test_serve_config_is_valid_and_builds_the_app():
    data = yaml.safe_load(CONFIG.read_text())
    schema = ServeDeploySchema.parse_obj(data)
    app = schema.applications[0]
    assert app.import_path == "serving.serve.app:build"
    assert data["grpc_options"]["grpc_servicer_functions"] == SERVICERS
    assert set(app.args) <= set(ServiceConfig.__dataclass_fields__)
    assert build(app.args) is not None  # the import path resolves and accepts the args
    deployment = app.deployments[0]
    assert deployment.max_ongoing_requests >= app.args["max_batch_size"]


def test_unknown_service_option_is_an_error():
    import pytest
    with pytest.raises(ValueError, match="unknown service options"):
        build({"registery": "x"})


def test_unknown_dtype_is_an_error_before_any_replica_starts():
    import pytest
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        build({"dtype": "fp8"})
    assert ServiceConfig.from_args({"dtype": "bfloat16"}).dtype == "bfloat16"
