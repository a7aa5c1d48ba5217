"""openapi.yaml is a valid OpenAPI 3.1 description, and the app serves it."""

from pathlib import Path

import yaml
from openapi_spec_validator import validate

SPEC = yaml.safe_load((Path(__file__).resolve().parent.parent / "openapi.yaml").read_text())


def test_the_description_is_valid_openapi_3_1():
    validate(SPEC)
    assert SPEC["openapi"].startswith("3.1")


def test_the_app_serves_it_as_json(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.json == SPEC


def test_every_route_is_described(app):
    routes = {rule.rule for rule in app.url_map.iter_rules() if rule.endpoint != "static"}
    assert routes == set(SPEC["paths"])
