"""Settings: every environment variable the service reads, converted and checked in one place.

``load_settings`` is the only reader of the environment. A setting that cannot be used stops
the start with a ``ConfigError`` that names the variable, and never prints a secret.
"""

import logging
import os
import re
import secrets
import sys
from collections.abc import Mapping
from typing import Any

import click
from dotenv import load_dotenv
from flask import Flask
from jwt.algorithms import HMACAlgorithm
from jwt.exceptions import InvalidKeyError
from limits import parse_many

# RFC 7518 §3.2: an HS256 key is at least as long as its hash, 256 bits.
MIN_SECRET_LENGTH = 32
# Servers that can run the app in several processes, found by their modules in the worker.
PRODUCTION_SERVERS = ("gunicorn", "granian")
ACCESS_ALGORITHMS = ("HS256", "EdDSA")
# The development server's demo account logs in with this well-known password (the README).
DEMO_PASSWORD = "demo-password"


class ConfigError(click.ClickException):
    """A setting that cannot be used; click prints the message without a traceback."""


def production_server() -> str | None:
    """Return the name of the multi-process server running this app, or None."""
    return next((name for name in PRODUCTION_SERVERS if name in sys.modules), None)


def init_app(app: Flask, test_config: Mapping[str, str] | None = None) -> None:
    """Put the settings in app.config: from the environment and .env, or test_config alone."""
    app.logger.setLevel(logging.INFO)
    if test_config is None:
        load_dotenv(".env")  # the real environment wins over .env
    app.config.update(load_settings(os.environ if test_config is None else test_config, app.logger))


def load_settings(env: Mapping[str, str], log: logging.Logger) -> dict[str, Any]:
    """Read, convert and check every setting; raise ConfigError naming the variable at fault."""
    app_env = env.get("APP_ENV") or "development"
    if app_env not in ("development", "production"):
        raise ConfigError(f"APP_ENV must be 'development' or 'production', not {app_env!r}.")
    production = app_env == "production"
    server = production_server()
    algorithm = env.get("ACCESS_TOKEN_ALGORITHM") or "HS256"
    if algorithm not in ACCESS_ALGORITHMS:
        raise ConfigError(f"ACCESS_TOKEN_ALGORITHM must be 'HS256' or 'EdDSA', not {algorithm!r}.")
    random_secrets: list[str] = []
    secret_names = ["REFRESH_TOKEN_SECRET"]
    if algorithm == "HS256":
        secret_names.insert(0, "ACCESS_TOKEN_SECRET")  # with EdDSA the access key is a key pair
    settings = {
        "APP_ENV": app_env,
        "SERVER": server,
        "ACCESS_TOKEN_ALGORITHM": algorithm,
        **{name: _secret(env, name, production, random_secrets) for name in secret_names},
        "ACCESS_TOKEN_PREVIOUS_SECRETS": _secrets(env, "ACCESS_TOKEN_PREVIOUS_SECRETS"),
        "REFRESH_TOKEN_PREVIOUS_SECRETS": _secrets(env, "REFRESH_TOKEN_PREVIOUS_SECRETS"),
        "ACCESS_TOKEN_PRIVATE_KEY_FILE": env.get("ACCESS_TOKEN_PRIVATE_KEY_FILE") or None,
        "ACCESS_TOKEN_PREVIOUS_PUBLIC_KEY_FILES": _list(
            env, "ACCESS_TOKEN_PREVIOUS_PUBLIC_KEY_FILES"
        ),
        "ACCESS_TOKEN_TTL": _integer(env, "ACCESS_TOKEN_TTL", 900, minimum=1),
        "REFRESH_TOKEN_TTL": _integer(env, "REFRESH_TOKEN_TTL", 1_209_600, minimum=1),
        "JWT_LEEWAY": _integer(env, "JWT_LEEWAY", 5, minimum=0),
        "JWT_ISSUER": env.get("JWT_ISSUER") or "jwt-refresh-service",
        "JWT_AUDIENCE": env.get("JWT_AUDIENCE") or "jwt-refresh-service",
        "SESSION_IDLE_TTL": _integer(env, "SESSION_IDLE_TTL", 604_800, minimum=0),
        "MAX_SESSIONS_PER_USER": _integer(env, "MAX_SESSIONS_PER_USER", 20, minimum=1),
        "REFRESH_REUSE_GRACE": _integer(env, "REFRESH_REUSE_GRACE", 10, minimum=0, maximum=300),
        "LOGIN_RATE_LIMIT": _rate_limit(env, "LOGIN_RATE_LIMIT", "10 per 15 minutes"),
        "LOGIN_ACCOUNT_RATE_LIMIT": _rate_limit(env, "LOGIN_ACCOUNT_RATE_LIMIT", "100 per day"),
        "LOGIN_ADDRESS_RATE_LIMIT": _rate_limit(
            env, "LOGIN_ADDRESS_RATE_LIMIT", "100 per 15 minutes"
        ),
        "MAX_CONCURRENT_LOGINS": _integer(
            env, "MAX_CONCURRENT_LOGINS", 2 * (os.cpu_count() or 1), minimum=1
        ),
        "USERS_FILE": env.get("USERS_FILE") or None,
        "DEMO_USER_EMAIL": env.get("DEMO_USER_EMAIL") or "demo@example.com",
        "DEMO_USER_PASSWORD": env.get("DEMO_USER_PASSWORD") or None,
        "INTROSPECTION_CLIENTS": _clients(env, "INTROSPECTION_CLIENTS"),
        "TRUSTED_PROXIES": _integer(env, "TRUSTED_PROXIES", 0, minimum=0, maximum=5),
        "HOST": env.get("HOST") or "127.0.0.1",
        "PORT": _integer(env, "PORT", 3000, minimum=1, maximum=65535),
        "REDIS_URL": env.get("REDIS_URL") or None,  # read by redis_store, which knows its kinds
        "METRICS_TOKEN": _bearer_token(env, "METRICS_TOKEN"),
        "PROMETHEUS_MULTIPROC_DIR": _directory(env, "PROMETHEUS_MULTIPROC_DIR"),
    }
    if not settings["DEMO_USER_PASSWORD"] and not (production or server or settings["USERS_FILE"]):
        # Only the development server, with no accounts of its own, gets the well-known demo
        # password: a production server never does (OWASP ASVS 2.1: no default credentials).
        settings["DEMO_USER_PASSWORD"] = DEMO_PASSWORD
    _check_keys_differ(settings, production, log)
    _check_server_fit(settings, production, server, random_secrets)
    if random_secrets and not app_command():
        log.warning(
            "%s not set: using random secrets, so tokens die with this process.",
            " and ".join(random_secrets),
        )
    return settings


def app_command() -> bool:
    """Tell whether a command of the app's own (`flask users ...`) is starting it: no server,
    so no tokens that random secrets would concern, and no accounts file needed yet."""
    context = click.get_current_context(silent=True)  # Flask builds the app to find the command
    return context is not None and context.parent is None


def _secret(env: Mapping[str, str], name: str, production: bool, randoms: list[str]) -> str:
    value = env.get(name)
    if value:
        return _checked_secret(name, value)
    if production:
        raise ConfigError(f"{name} is not set; production needs a long random secret.")
    randoms.append(name)
    return secrets.token_urlsafe(32)


def _checked_secret(name: str, value: str) -> str:
    if len(value) < MIN_SECRET_LENGTH:
        raise ConfigError(f"{name} is shorter than {MIN_SECRET_LENGTH} characters.")
    try:
        HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(value)
    except InvalidKeyError:
        raise ConfigError(f"{name} looks like a PEM or SSH key; use a random string.") from None
    return value


def _optional_secret(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    return _checked_secret(name, value) if value else None


def _bearer_token(env: Mapping[str, str], name: str) -> str | None:
    token = _optional_secret(env, name)
    # RFC 6750 §2.1's b64token: what an Authorization: Bearer header can carry, so that a token
    # set here (with a space, say) can always be sent.
    if token is not None and not re.fullmatch(r"[A-Za-z0-9\-._~+/]+=*", token):
        raise ConfigError(
            f"{name} must be a bearer token (RFC 6750 §2.1): letters, digits and - . _ ~ + /, "
            "then any '=', with no spaces."
        )
    return token


def _list(env: Mapping[str, str], name: str) -> list[str]:
    return [item.strip() for item in (env.get(name) or "").split(",") if item.strip()]


def _secrets(env: Mapping[str, str], name: str) -> list[str]:
    return [_checked_secret(name, value) for value in _list(env, name)]


def _clients(env: Mapping[str, str], name: str) -> dict[str, str]:
    clients = {}
    for pair in _list(env, name):
        client_id, _, secret = pair.partition(":")
        if not client_id or len(secret) < 16:
            raise ConfigError(
                f"{name} must be 'id:secret' pairs, each secret at least 16 characters."
            )
        clients[client_id] = secret
    return clients


def _integer(
    env: Mapping[str, str], name: str, default: int, *, minimum: int, maximum: int | None = None
) -> int:
    raw = env.get(name) or str(default)
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, not {raw!r}.") from None
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and at most {maximum}" if maximum is not None else ""
        raise ConfigError(f"{name} must be at least {minimum}{upper}, not {value}.")
    return value


def _directory(env: Mapping[str, str], name: str) -> str | None:
    path = env.get(name) or None
    if path and not os.path.isdir(path):
        raise ConfigError(f"{name} must name a directory that exists, not {path!r}.")
    return path


def _rate_limit(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name) or default
    try:
        limits = parse_many(raw)
    except ValueError:
        limits = []
    if len(limits) != 1:  # one limit a setting: the others would be silently ignored
        raise ConfigError(f"{name} must read like '10 per 15 minutes', not {raw!r}.")
    return raw


def _check_keys_differ(settings: dict[str, Any], production: bool, log: logging.Logger) -> None:
    # RFC 8725 §3.12: one key per kind of token, so one kind can never pass for the other.
    access = [settings.get("ACCESS_TOKEN_SECRET"), *settings["ACCESS_TOKEN_PREVIOUS_SECRETS"]]
    refresh = [settings["REFRESH_TOKEN_SECRET"], *settings["REFRESH_TOKEN_PREVIOUS_SECRETS"]]
    if not set(access) & set(refresh):
        return
    name = (
        "ACCESS_TOKEN_SECRET"
        if settings.get("ACCESS_TOKEN_SECRET") in refresh
        else ("ACCESS_TOKEN_PREVIOUS_SECRETS")
    )
    message = f"{name} must differ from every refresh token secret."
    if production:
        raise ConfigError(message)
    log.warning("%s Tokens are still told apart by their type, but use separate secrets.", message)


def _check_server_fit(
    settings: dict[str, Any], production: bool, server: str | None, randoms: list[str]
) -> None:
    if server is None:
        return
    if randoms:
        # Each worker would draw its own random key, and reject the others' tokens.
        raise ConfigError(f"{randoms[0]} must be set under {server}, whose workers must share it.")
    if production and not settings["REDIS_URL"]:
        # Each worker would keep its own sessions: a session ended in one lives on in another.
        raise ConfigError(
            f"Production under {server} needs REDIS_URL: with the in-memory store each worker "
            "keeps its own sessions, so a logout would not reach the others."
        )
