"""The HTTP contract (issue 22): ``/openapi.json`` of ``cascade serve`` and ``cascade
serve-oracle`` states every request, response and status, and schemathesis (the OpenAPI
fuzzer, with its default checks) finds no difference between the schema and the servers.
Loopback only; a fixed seed and a bounded number of examples."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cascade.deploy.bundle import Bundle
from cascade.serve import ServerProcess, create_app, create_oracle_app


def _openapi(app) -> dict:
    with TestClient(app) as client:
        return client.get("/openapi.json").json()


def test_the_serve_schema_states_the_bodies_the_shapes_and_every_status(bundles):
    spec = _openapi(create_app(Bundle.load(bundles["white_box"]), max_request_inputs=100))
    op = spec["paths"]["/predict"]["post"]
    body = op["requestBody"]
    assert body["required"] and set(body["content"]) == {"application/json", "application/x-npy"}
    assert body["content"]["application/x-npy"]["schema"] == {
        "type": "string", "format": "binary",
        "description": "the bytes of numpy.save of an array [B, 1, 8, 8] or [1, 8, 8] (no pickles)"}
    one, batch = body["content"]["application/json"]["schema"]["anyOf"]
    assert one["required"] == ["input"] and one["additionalProperties"] is False
    assert one["properties"]["input"]["description"] == "one raw input of shape [1, 8, 8]"
    assert one["properties"]["input"]["examples"] == [[[[0] * 8] * 8]]
    rows = batch["properties"]["inputs"]["anyOf"][0]
    assert (rows["minItems"], rows["maxItems"]) == (1, 100)
    assert (rows["items"]["minItems"], rows["items"]["maxItems"]) == (1, 1)  # [B, 1, 8, 8]
    assert set(op["responses"]) == {"200", "400", "413", "415", "422", "503"}
    assert op["responses"]["422"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorDetail"}
    prediction = spec["components"]["schemas"]["Prediction"]["properties"]
    assert set(prediction) == {"prediction", "stage", "score", "mflops", "fallback"}
    assert prediction["fallback"]["type"] == "boolean"
    assert set(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    health = spec["paths"]["/health"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert health == {"$ref": "#/components/schemas/ServeHealth"}
    assert "security" not in op


def test_with_a_token_the_schema_states_the_bearer_scheme_and_the_401(bundles):
    spec = _openapi(create_app(Bundle.load(bundles["white_box"]), token="s3cret"))
    op = spec["paths"]["/predict"]["post"]
    assert "401" in op["responses"] and op["security"] == [{"HTTPBearer": []}]
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "security" not in spec["paths"]["/health"]["get"]


def test_the_oracle_schema_states_the_protocol(bundles):
    bundle = Bundle.load(bundles["white_box"])
    spec = _openapi(create_oracle_app(bundle))
    op = spec["paths"]["/predict"]["post"]
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    assert schema["required"] == ["inputs"] and "input" not in schema["properties"]
    out = op["responses"]["200"]["content"]["application/json"]["schema"]
    outputs = spec["components"]["schemas"][out["$ref"].rsplit("/", 1)[1]]["properties"]["outputs"]
    assert (outputs["items"]["minItems"], outputs["items"]["maxItems"]) == (10, 10) == (len(bundle.output_names),) * 2
    assert set(op["responses"]) == {"200", "400", "413", "415", "422", "503"}


def _schemathesis(url: str, examples: int, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("schemathesis")
    return subprocess.run([str(exe) if exe.exists() else shutil.which("schemathesis") or "schemathesis", "run",
                           f"{url}/openapi.json", "--max-examples", str(examples), "--seed", "1", "--workers", "1",
                           "--no-color"], capture_output=True, text=True, timeout=300, check=False,
                          cwd=cwd)  # its .schemathesis/ cache goes there, not into the repository


@pytest.mark.slow
@pytest.mark.parametrize("command", ["serve", "serve-oracle"])
def test_schemathesis_finds_no_failure_against_either_server(bundles, command, tmp_path):
    """``schemathesis run`` with its default checks (no server errors; status codes,
    content types and response schemas as documented; schema-valid data accepted,
    schema-invalid data refused), seed 1, 10 examples per operation."""
    pytest.importorskip("schemathesis")
    with ServerProcess([command, str(bundles["white_box"])]) as server:
        done = _schemathesis(server.url, 10, tmp_path)
        assert server.proc.poll() is None
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "No issues found" in done.stdout and " passed" in done.stdout
