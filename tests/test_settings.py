"""Settings: what each environment variable does, and how a mistake in one stops the start."""

import logging
import sys

import pytest

from server import create_app
from settings import ConfigError, load_settings

from .conftest import (
    ACCESS_SECRET,
    DEMO,
    PRODUCTION,
    ROOT,
    TEST_CONFIG,
    call,
    free_port,
    run_server,
    serve,
    user_env,
)

LOG = logging.getLogger("test")


# --- settings ------------------------------------------------------------------------------


def test_defaults():
    settings = load_settings({}, LOG)
    assert settings["APP_ENV"] == "development"
    assert (settings["ACCESS_TOKEN_TTL"], settings["REFRESH_TOKEN_TTL"]) == (900, 1_209_600)
    assert (settings["HOST"], settings["PORT"]) == ("127.0.0.1", 3000)
    assert settings["DEMO_USER_EMAIL"] == "demo@example.com"
    assert settings["DEMO_USER_PASSWORD"] == "demo-password"
    assert settings["ACCESS_TOKEN_SECRET"] != settings["REFRESH_TOKEN_SECRET"]
    assert len(settings["ACCESS_TOKEN_SECRET"]) >= 32


def test_development_warns_once_about_random_secrets(caplog):
    load_settings({}, LOG)
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "ACCESS_TOKEN_SECRET and REFRESH_TOKEN_SECRET not set: using random secrets, "
        "so tokens die with this process."
    ]


def test_random_secrets_differ_per_process():
    assert (
        load_settings({}, LOG)["ACCESS_TOKEN_SECRET"]
        != load_settings({}, LOG)["ACCESS_TOKEN_SECRET"]
    )


def test_development_allows_equal_secrets_with_a_warning(caplog):
    load_settings(
        {"ACCESS_TOKEN_SECRET": ACCESS_SECRET, "REFRESH_TOKEN_SECRET": ACCESS_SECRET}, LOG
    )
    assert "must differ" in caplog.text


def test_production_has_no_demo_user_by_default():
    """OWASP ASVS 2.1: no well-known credentials where it counts."""
    assert load_settings(PRODUCTION, LOG)["DEMO_USER_PASSWORD"] is None
    with pytest.raises(ConfigError, match="Production has no accounts: set USERS_FILE"):
        create_app(PRODUCTION)  # and without the demo account, it would have none at all


def test_production_demo_user_when_password_set():
    app = create_app(PRODUCTION | {"DEMO_USER_PASSWORD": "a long chosen password"})
    body = {"email": DEMO["email"], "password": "a long chosen password"}
    assert app.test_client().post("/login", json=body).status_code == 200


@pytest.mark.parametrize(
    "env, variable",
    [
        (PRODUCTION | {"ACCESS_TOKEN_SECRET": ""}, "ACCESS_TOKEN_SECRET is not set"),
        ({"APP_ENV": "production", "ACCESS_TOKEN_SECRET": ACCESS_SECRET}, "REFRESH_TOKEN_SECRET"),
        (PRODUCTION | {"REFRESH_TOKEN_SECRET": "short"}, "REFRESH_TOKEN_SECRET is shorter"),
        (PRODUCTION | {"REFRESH_TOKEN_SECRET": ACCESS_SECRET}, "must differ"),
        ({"ACCESS_TOKEN_SECRET": "short"}, "ACCESS_TOKEN_SECRET is shorter"),
        ({"APP_ENV": "staging"}, "APP_ENV"),
        ({"ACCESS_TOKEN_TTL": "15m"}, "ACCESS_TOKEN_TTL must be a whole number"),
        ({"ACCESS_TOKEN_TTL": "0"}, "ACCESS_TOKEN_TTL must be at least 1"),
        ({"REFRESH_TOKEN_TTL": "-5"}, "REFRESH_TOKEN_TTL must be at least 1"),
        ({"JWT_LEEWAY": "-1"}, "JWT_LEEWAY"),
        ({"PORT": "http"}, "PORT must be a whole number"),
        ({"PORT": "70000"}, "PORT must be at least 1 and at most 65535"),
        ({"LOGIN_RATE_LIMIT": "lots"}, "LOGIN_RATE_LIMIT"),
        ({"ACCESS_TOKEN_SECRET": "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ"}, "ACCESS_TOKEN_SECRET"),
    ],
)
def test_unusable_settings_name_the_variable(env, variable):
    with pytest.raises(ConfigError, match=variable):
        load_settings(env, LOG)


@pytest.mark.parametrize(
    "env, variable",
    [
        ({"APP_ENV": "production"}, "ACCESS_TOKEN_SECRET"),
        ({"PORT": "not-a-port"}, "PORT"),
        ({"REFRESH_TOKEN_TTL": "forever"}, "REFRESH_TOKEN_TTL"),
    ],
)
def test_config_mistake_stops_the_process_without_a_traceback(tmp_path, env, variable):
    result = run_server(env, tmp_path)
    assert result.returncode != 0
    assert variable in result.stderr
    assert "Traceback" not in result.stderr


def test_dotenv_is_read_and_the_environment_wins(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("ACCESS_TOKEN_TTL=60\nREFRESH_TOKEN_TTL=120\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ACCESS_TOKEN_TTL", raising=False)
    monkeypatch.setenv("REFRESH_TOKEN_TTL", "240")
    for name in ("ACCESS_TOKEN_SECRET", "REFRESH_TOKEN_SECRET"):
        monkeypatch.setenv(name, TEST_CONFIG[name])
    app = create_app()
    monkeypatch.delenv("ACCESS_TOKEN_TTL")  # load_dotenv put it into os.environ
    assert (app.config["ACCESS_TOKEN_TTL"], app.config["REFRESH_TOKEN_TTL"]) == (60, 240)


# A developer's .env, as .env.example invites: it must change nothing the suite tests.
HOSTILE_DOTENV = """APP_ENV=production
ACCESS_TOKEN_TTL=1
DEMO_USER_PASSWORD=not-the-demo-password
LOGIN_RATE_LIMIT=1 per day
REDIS_URL=redis://127.0.0.1:1/0
"""


@pytest.fixture
def developers_dotenv():
    """A .env in the repository, as a developer leaves one: theirs, or a hostile one."""
    path = ROOT / ".env"
    if path.exists():
        yield path
        return
    path.write_text(HOSTILE_DOTENV)
    try:
        yield path
    finally:
        path.unlink()


def test_the_suite_ignores_a_developers_dotenv(developers_dotenv, live_server, app):
    # In-process apps read test_config alone; servers run in a folder of their own.
    assert app.test_client().post("/login", json=DEMO).json["expiresIn"] == 900
    status, _, tokens = call(live_server, "POST", "/login", DEMO)
    assert (status, tokens["expiresIn"]) == (200, 900)


def test_start_up_warns_once_and_says_where_to_open(tmp_path):
    port = free_port()
    command = [sys.executable, str(ROOT / "server.py")]
    with serve(command, user_env(PORT=str(port)), tmp_path, port) as (url, log_path):
        call(url, "GET", "/healthz")
    log = log_path.read_text()
    assert log.count("random secrets") == 1
    assert f"Open http://127.0.0.1:{port}/ " in log
