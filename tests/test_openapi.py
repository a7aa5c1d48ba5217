"""openapi.yaml is a valid OpenAPI 3.1 description of every route, and the app serves it."""

import re
from pathlib import Path

import yaml

SPEC = yaml.safe_load((Path(__file__).resolve().parent.parent / "openapi.yaml").read_text())
IMPLICIT_METHODS = {"HEAD", "OPTIONS"}  # Flask answers these for every route by itself


def test_the_description_is_valid_openapi_3_1():
    from openapi_spec_validator import validate  # a fifth of a second: only where it runs

    validate(SPEC)
    assert SPEC["openapi"].startswith("3.1")


def test_the_app_serves_it_as_json(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.json == SPEC


def test_every_route_and_method_is_described(app):
    routes = {
        # Flask's /sessions/<sid> is OpenAPI's /sessions/{...}: compare the shapes, not the names.
        re.sub(r"<[^>]+>", "{}", rule.rule): rule.methods - IMPLICIT_METHODS
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static"
    }
    described = {
        re.sub(r"{[^}]+}", "{}", path): {method.upper() for method in operations}
        for path, operations in SPEC["paths"].items()
    }
    assert routes == described


def test_the_server_url_is_relative_so_any_port_works():
    # A client that imports /openapi.json from port 5000 must call port 5000, not 3000.
    assert [server["url"] for server in SPEC["servers"]] == ["/"]
