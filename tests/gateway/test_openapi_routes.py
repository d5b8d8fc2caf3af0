"""`/openapi.json` documents the generation routes, though they are plain Starlette routes."""

from __future__ import annotations

from starlette.testclient import TestClient

from tokenfactory.engine.config import EngineConfig
from tokenfactory.gateway.app import build_app


def test_the_generation_routes_and_their_bodies_are_in_the_schema(tiny_model_dir):
    config = EngineConfig.from_pretrained(tiny_model_dir, served_model_name="tiny")
    http = TestClient(build_app(config))  # lifespan not run: the schema needs no engine
    schema = http.get("/openapi.json").json()
    schemas = schema["components"]["schemas"]
    for path, model in (("/v1/chat/completions", "ChatCompletionRequest"), ("/v1/completions", "CompletionRequest")):
        post = schema["paths"][path]["post"]
        ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{model}" and "400" in post["responses"]
        assert "model" in schemas[model]["required"]
    assert "messages" in schemas["ChatCompletionRequest"]["properties"]
    # Every reference inside the added bodies resolves within the document.
    text = str(schema)
    for name in schemas:
        text = text.replace(f"#/components/schemas/{name}'", "")
    assert "#/components/schemas/" not in text and "$defs" not in text
    assert "/v1/models" in schema["paths"]  # FastAPI's own routes are still there
