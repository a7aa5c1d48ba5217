"""Other services trust our tokens: key ids, rotation, EdDSA and its JWKS, and introspection.

Each refused token here is built from a live session's claims, so the only thing wrong with it
is the thing the row names: if that were let through, the request would succeed.
"""

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import jwt
import pytest
import time_machine
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)
from werkzeug.datastructures import ResponseCacheControl
from werkzeug.http import parse_cache_control_header

from errors import after_colon
from keys import generate, hmac_kid, thumbprint
from server import create_app
from settings import ConfigError, load_settings

from .conftest import (
    ACCESS_SECRET,
    DEMO,
    DEMO_ID,
    REFRESH_SECRET,
    ROOT,
    TEST_CONFIG,
    AuthActions,
    call,
    free_port,
    released_together,
    run_server,
    serve,
    serving,
    user_env,
)

LOG = logging.getLogger("test_other_services")
NEW_ACCESS = "rotated-access-secret-0123456789abcdef"
NEW_REFRESH = "rotated-refresh-secret-0123456789abcdef"
CLIENT_ID, CLIENT_SECRET = "posts", "posts-secret-0123456789"
CLIENTS = {"INTROSPECTION_CLIENTS": f"{CLIENT_ID}:{CLIENT_SECRET},billing:billing-secret-0123"}
PRODUCTION = {"APP_ENV": "production", "REFRESH_TOKEN_SECRET": REFRESH_SECRET}
INACTIVE = {"active": False}
JWKS_PATH = "/.well-known/jwks.json"
POST_1 = {"posts": [{"author": DEMO_ID, "title": "Post 1"}]}

# Our own words for each refusal (auth.py), so a row refused for another reason fails.
UNKNOWN_KEY = "The token is signed with a key this service does not hold."
NOT_ALLOWED = "The token is signed with an algorithm this service refuses."
BAD_SIGNATURE = "The token's signature does not match."
KEY_POINTER = "The token's header points at a key; this service never uses one."


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims_of(token):
    return jwt.decode(token, options={"verify_signature": False})


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def basic(client_id=CLIENT_ID, secret=CLIENT_SECRET):
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


def sign(payload, key, algorithm, typ="at+jwt", **headers):
    """A token over ``payload``; a header given as None is left out."""
    headers = {name: value for name, value in ({"typ": typ} | headers).items() if value is not None}
    return jwt.encode(payload, key, algorithm, headers=headers)


def hs256_with(key: bytes, payload, kid):
    """An HS256 token keyed with any bytes, even a public key PyJWT would refuse to use."""
    header = {"alg": "HS256", "typ": "at+jwt", "kid": kid}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def expired(payload):
    """The same claims, past their expiry by more than the leeway: a negative lifetime."""
    now = int(time.time())
    return payload | {"iat": now - 1000, "exp": now - 100}


def new_key(tmp_path, name):
    """An Ed25519 key pair on disk, as `python keys.py generate` makes it: its path and kid."""
    path = str(tmp_path / f"{name}.pem")
    return path, generate(path)


def private_key(path):
    with open(path, "rb") as file:
        return load_pem_private_key(file.read(), password=None)


def eddsa(private_file, *previous_public_files):
    """The settings of EdDSA access tokens (refresh tokens keep their own secret)."""
    return {
        "ACCESS_TOKEN_ALGORITHM": "EdDSA",
        "ACCESS_TOKEN_PRIVATE_KEY_FILE": private_file,
        "ACCESS_TOKEN_PREVIOUS_PUBLIC_KEY_FILES": ",".join(previous_public_files),
        "REFRESH_TOKEN_SECRET": REFRESH_SECRET,
    }


def refused_at_me(response, reason):
    """401 at GET /me, for exactly this reason."""
    message = (
        f"The access token is not valid: {after_colon(reason)} Log in or refresh to get a new one."
    )
    assert (response.status_code, response.json) == (
        401,
        {"error": "invalid_token", "message": message},
    )


def max_age(response):
    return parse_cache_control_header(
        response.headers["Cache-Control"], cls=ResponseCacheControl
    ).max_age


# --- every token names its key -------------------------------------------------------------


def test_hs256_tokens_name_their_secret_by_a_hash_of_it(auth_actions):
    tokens = auth_actions.tokens()
    assert jwt.get_unverified_header(tokens["accessToken"]) == {
        "alg": "HS256",
        "typ": "at+jwt",
        "kid": hmac_kid(ACCESS_SECRET),
    }
    assert jwt.get_unverified_header(tokens["refreshToken"]) == {
        "alg": "HS256",
        "typ": "rt+jwt",
        "kid": hmac_kid(REFRESH_SECRET),
    }
    assert hmac_kid(ACCESS_SECRET) != hmac_kid(REFRESH_SECRET)


def test_eddsa_access_tokens_carry_the_key_thumbprint(tmp_path):
    path, kid = new_key(tmp_path, "access")
    client = create_app(eddsa(path)).test_client()
    tokens = AuthActions(client).tokens()
    assert jwt.get_unverified_header(tokens["accessToken"]) == {
        "alg": "EdDSA",
        "typ": "at+jwt",
        "kid": kid,
    }
    # Refresh tokens stay HS256 under their own secret: only this service reads them.
    assert jwt.get_unverified_header(tokens["refreshToken"])["kid"] == hmac_kid(REFRESH_SECRET)
    (published,) = client.get(JWKS_PATH).json["keys"]
    assert published["kid"] == kid == thumbprint(published)
    # What other services do: find the key by the token's kid and verify with it.
    key = jwt.PyJWKSet.from_dict(client.get(JWKS_PATH).json)[kid]
    verified = jwt.decode(
        tokens["accessToken"], key, algorithms=["EdDSA"], audience="jwt-refresh-service"
    )
    assert verified["sub"] == DEMO_ID


# --- rotation with live sessions, on both stores -------------------------------------------


@pytest.fixture(params=["memory", "redis"])
def store(request):
    """The settings of each store: none for memory, REDIS_URL on an emptied database."""
    if request.param == "memory":
        return {}
    request.getfixturevalue("redis_client")
    return {"REDIS_URL": request.getfixturevalue("redis_url")}


def restart(app, config):
    """The service started again with new key settings, its sessions kept.

    Redis keeps them by itself; the memory store lives in the process, so it is handed over,
    so that the keys are the only thing that changes.
    """
    restarted = create_app(config)
    if app.extensions["store"].kind == "memory":
        restarted.extensions["store"] = app.extensions["store"]
    return restarted


def test_rotating_secrets_logs_no_one_out(store):
    before = create_app(TEST_CONFIG | store)
    used = AuthActions(before.test_client()).tokens()
    idle = AuthActions(before.test_client()).tokens()  # will not refresh before the old go
    # Promote: new secrets sign, the old ones only verify.
    promoted = restart(
        before,
        store
        | {
            "ACCESS_TOKEN_SECRET": NEW_ACCESS,
            "ACCESS_TOKEN_PREVIOUS_SECRETS": ACCESS_SECRET,
            "REFRESH_TOKEN_SECRET": NEW_REFRESH,
            "REFRESH_TOKEN_PREVIOUS_SECRETS": REFRESH_SECRET,
        },
    )
    actions = AuthActions(promoted.test_client())
    assert actions.me(used["accessToken"]).status_code == 200
    assert actions.me(idle["accessToken"]).status_code == 200
    response = actions.refresh(used["refreshToken"])
    assert response.status_code == 200
    renewed = response.json
    assert jwt.get_unverified_header(renewed["accessToken"])["kid"] == hmac_kid(NEW_ACCESS)
    assert jwt.get_unverified_header(renewed["refreshToken"])["kid"] == hmac_kid(NEW_REFRESH)
    # Retire: the old secrets are gone, and every token they signed with them.
    retired = AuthActions(
        restart(
            promoted,
            store | {"ACCESS_TOKEN_SECRET": NEW_ACCESS, "REFRESH_TOKEN_SECRET": NEW_REFRESH},
        ).test_client()
    )
    refused_at_me(retired.me(used["accessToken"]), UNKNOWN_KEY)
    refused_at_me(retired.me(idle["accessToken"]), UNKNOWN_KEY)
    response = retired.refresh(idle["refreshToken"])
    assert (response.status_code, response.json["message"]) == (
        403,
        f"The refresh token is not valid: {after_colon(UNKNOWN_KEY)} Log in again.",
    )
    # The session that refreshed after the promotion lives on under the new secrets.
    assert retired.me(renewed["accessToken"]).status_code == 200
    assert retired.refresh(renewed["refreshToken"]).status_code == 200


def test_rotating_the_ed25519_key_logs_no_one_out(store, tmp_path):
    old, old_kid = new_key(tmp_path, "access-1")
    new, new_kid = new_key(tmp_path, "access-2")
    before = create_app(store | eddsa(old))
    tokens = AuthActions(before.test_client()).tokens()
    promoted = restart(before, store | eddsa(new, f"{old}.pub"))
    client = promoted.test_client()
    assert [key["kid"] for key in client.get(JWKS_PATH).json["keys"]] == [new_kid, old_kid]
    assert AuthActions(client).me(tokens["accessToken"]).status_code == 200
    renewed = AuthActions(client).refresh(tokens["refreshToken"]).json
    assert jwt.get_unverified_header(renewed["accessToken"])["kid"] == new_kid
    retired = restart(promoted, store | eddsa(new)).test_client()
    assert [key["kid"] for key in retired.get(JWKS_PATH).json["keys"]] == [new_kid]
    refused_at_me(AuthActions(retired).me(tokens["accessToken"]), UNKNOWN_KEY)
    assert AuthActions(retired).me(renewed["accessToken"]).status_code == 200


# --- refused: keys that are not ours, and algorithms we did not pin -------------------------


class Forger:
    """What an attacker may hold against an EdDSA service: our public key, and a live session."""

    def __init__(self, tmp_path):
        current, self.our_kid = new_key(tmp_path, "current")
        retired, self.retired_kid = new_key(tmp_path, "retired")
        self.ours, self.retired = private_key(current), private_key(retired)
        self.public = self.ours.public_key()
        self.stranger = Ed25519PrivateKey.generate()
        self.stranger_kid = thumbprint(jwk_of(self.stranger))
        # TEST_CONFIG's ACCESS_TOKEN_SECRET too: with EdDSA it is set, and ignored.
        self.client = create_app(TEST_CONFIG | eddsa(current)).test_client()
        self.tokens = AuthActions(self.client).tokens()
        self.claims = claims_of(self.tokens["accessToken"])  # a live session's


def jwk_of(key):
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "x": b64(raw)}


@pytest.fixture
def forger(tmp_path):
    return Forger(tmp_path)


def public_pem(forger):
    return forger.public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def public_raw(forger):
    return forger.public.public_bytes(Encoding.Raw, PublicFormat.Raw)


# fmt: off
EDDSA_ATTACKS = [
    # RFC 7515 §4.1.4: the kid names one of our keys, or the token is refused.
    ("unknown kid", lambda f: sign(f.claims, f.ours, "EdDSA", kid="not-one-of-ours"), UNKNOWN_KEY),
    ("no kid", lambda f: sign(f.claims, f.ours, "EdDSA"), UNKNOWN_KEY),
    ("retired key", lambda f: sign(f.claims, f.retired, "EdDSA", kid=f.retired_kid), UNKNOWN_KEY),
    ("stranger's key, its own kid",
     lambda f: sign(f.claims, f.stranger, "EdDSA", kid=f.stranger_kid), UNKNOWN_KEY),
    ("stranger's key, our kid",
     lambda f: sign(f.claims, f.stranger, "EdDSA", kid=f.our_kid), BAD_SIGNATURE),
    # RFC 8725 §3.1: EdDSA is pinned; an HS256 token is refused whatever its key.
    ("HS256 with the ignored access secret, its kid",
     lambda f: sign(f.claims, ACCESS_SECRET, "HS256", kid=hmac_kid(ACCESS_SECRET)), UNKNOWN_KEY),
    ("HS256 with the ignored access secret, our kid",
     lambda f: sign(f.claims, ACCESS_SECRET, "HS256", kid=f.our_kid), NOT_ALLOWED),
    # RFC 8725 §2.1: key confusion, HMAC keyed with the public key everyone may fetch.
    ("HS256 keyed with our public key's bytes",
     lambda f: hs256_with(public_raw(f), f.claims, f.our_kid), NOT_ALLOWED),
    ("HS256 keyed with our public key's PEM",
     lambda f: hs256_with(public_pem(f), f.claims, f.our_kid), NOT_ALLOWED),
    ("HS256 keyed with our JWK's x",
     lambda f: hs256_with(jwk_of(f.ours)["x"].encode(), f.claims, f.our_kid), NOT_ALLOWED),
]
# fmt: on


def test_the_forger_signs_like_us(forger):
    """The control row: the same builder, with our key and kid, makes a token /me accepts."""
    token = sign(forger.claims, forger.ours, "EdDSA", kid=forger.our_kid)
    assert AuthActions(forger.client).me(token).status_code == 200


@pytest.mark.parametrize(
    "make_token, reason", [row[1:] for row in EDDSA_ATTACKS], ids=[row[0] for row in EDDSA_ATTACKS]
)
def test_eddsa_service_refuses(forger, make_token, reason):
    refused_at_me(AuthActions(forger.client).me(make_token(forger)), reason)


@pytest.mark.parametrize("header", ["jku", "x5u"])
def test_keys_a_token_points_at_are_never_fetched(forger, header):
    """RFC 8725 §3.10: a JWKS holding the stranger's key, named by the token, is never asked."""
    jwks = {"keys": [jwk_of(forger.stranger) | {"kid": forger.stranger_kid}]}
    with serving(lambda: (200, {}, jwks)) as (url, seen):
        pointer = {header: url + JWKS_PATH}
        token = sign(forger.claims, forger.stranger, "EdDSA", kid=forger.stranger_kid, **pointer)
        refused_at_me(AuthActions(forger.client).me(token), KEY_POINTER)
    assert seen == []


STRANGER = Ed25519PrivateKey.generate()
RETIRED_SECRET = "a-retired-access-secret-0123456789abc"
STRANGER_SECRET = "a-stranger-guessed-this-secret-000000"

# fmt: off
HS256_ATTACKS = [
    ("EdDSA token, our kid", lambda c: sign(c, STRANGER, "EdDSA", kid=hmac_kid(ACCESS_SECRET)),
     NOT_ALLOWED),
    ("EdDSA token, its own kid",
     lambda c: sign(c, STRANGER, "EdDSA", kid=thumbprint(jwk_of(STRANGER))), UNKNOWN_KEY),
    ("retired secret", lambda c: sign(c, RETIRED_SECRET, "HS256", kid=hmac_kid(RETIRED_SECRET)),
     UNKNOWN_KEY),
    ("unknown kid", lambda c: sign(c, ACCESS_SECRET, "HS256", kid="not-one-of-ours"), UNKNOWN_KEY),
]
# fmt: on


@pytest.mark.parametrize(
    "make_token, reason", [row[1:] for row in HS256_ATTACKS], ids=[row[0] for row in HS256_ATTACKS]
)
def test_hs256_service_refuses(auth_actions, make_token, reason):
    live = claims_of(auth_actions.tokens()["accessToken"])
    control = sign(live, ACCESS_SECRET, "HS256", kid=hmac_kid(ACCESS_SECRET))
    assert auth_actions.me(control).status_code == 200
    refused_at_me(auth_actions.me(make_token(live)), reason)


# Each row re-signs a live session's *current* refresh token claims.
# fmt: off
REFRESH_FORGERIES = [
    ("unknown kid", lambda c: sign(c, REFRESH_SECRET, "HS256", "rt+jwt", kid="not-ours"),
     UNKNOWN_KEY),
    ("retired secret", lambda c: sign(c, RETIRED_SECRET, "HS256", "rt+jwt",
                                      kid=hmac_kid(RETIRED_SECRET)), UNKNOWN_KEY),
    ("stranger's secret, our kid", lambda c: sign(c, STRANGER_SECRET, "HS256", "rt+jwt",
                                                  kid=hmac_kid(REFRESH_SECRET)), BAD_SIGNATURE),
    ("EdDSA, our kid", lambda c: sign(c, STRANGER, "EdDSA", "rt+jwt", kid=hmac_kid(REFRESH_SECRET)),
     NOT_ALLOWED),
    ("jku header", lambda c: sign(c, REFRESH_SECRET, "HS256", "rt+jwt",
                                  kid=hmac_kid(REFRESH_SECRET), jku="http://127.0.0.1:9/jwks.json"),
     KEY_POINTER),
]
# fmt: on


@pytest.fixture
def no_grace():
    """Without a grace window, so that a token spent once is refused the next time."""
    return AuthActions(create_app(TEST_CONFIG | {"REFRESH_REUSE_GRACE": "0"}).test_client())


def test_a_forged_refresh_token_would_spend_the_session(no_grace):
    """The control: signed with our secret, the same claims spend the genuine token."""
    tokens = no_grace.tokens()
    copy = sign(claims_of(tokens["refreshToken"]), REFRESH_SECRET, "HS256", "rt+jwt",
                kid=hmac_kid(REFRESH_SECRET))  # fmt: skip
    assert no_grace.refresh(copy).status_code == 200
    assert no_grace.refresh(tokens["refreshToken"]).status_code == 403


@pytest.mark.parametrize(
    "make_token, reason",
    [row[1:] for row in REFRESH_FORGERIES],
    ids=[row[0] for row in REFRESH_FORGERIES],
)
def test_a_refused_refresh_token_spends_nothing(no_grace, make_token, reason):
    tokens = no_grace.tokens()
    response = no_grace.refresh(make_token(claims_of(tokens["refreshToken"])))
    assert (response.status_code, response.json) == (
        403,
        {
            "error": "invalid_refresh_token",
            "message": f"The refresh token is not valid: {after_colon(reason)} Log in again.",
        },
    )
    assert no_grace.refresh(tokens["refreshToken"]).status_code == 200


# --- settings ------------------------------------------------------------------------------

SECRETS = {"ACCESS_TOKEN_SECRET": ACCESS_SECRET, "REFRESH_TOKEN_SECRET": REFRESH_SECRET}


@pytest.mark.parametrize("app_env", ["development", "production"])
@pytest.mark.parametrize("kind", ["ACCESS", "REFRESH"])
def test_a_short_previous_secret_stops_the_start(app_env, kind):
    name = f"{kind}_TOKEN_PREVIOUS_SECRETS"
    env = SECRETS | {"APP_ENV": app_env, name: f"{NEW_ACCESS},short-secret"}
    with pytest.raises(ConfigError, match=f"^{name} is shorter than 32 characters.$"):
        load_settings(env, LOG)


OTHER = "another-secret-0123456789abcdefghijk"
# Four ways an access secret can equal a refresh secret, and the variable named for each.
EQUAL_SECRETS = [
    ({"REFRESH_TOKEN_SECRET": ACCESS_SECRET}, "ACCESS_TOKEN_SECRET"),
    ({"REFRESH_TOKEN_PREVIOUS_SECRETS": f"{OTHER},{ACCESS_SECRET}"}, "ACCESS_TOKEN_SECRET"),
    ({"ACCESS_TOKEN_PREVIOUS_SECRETS": REFRESH_SECRET}, "ACCESS_TOKEN_PREVIOUS_SECRETS"),
    (
        {"ACCESS_TOKEN_PREVIOUS_SECRETS": OTHER, "REFRESH_TOKEN_PREVIOUS_SECRETS": OTHER},
        "ACCESS_TOKEN_PREVIOUS_SECRETS",
    ),
]
EQUAL_IDS = ["current=current", "current=previous", "previous=current", "previous=previous"]


@pytest.mark.parametrize("change, name", EQUAL_SECRETS, ids=EQUAL_IDS)
def test_production_refuses_an_access_secret_equal_to_a_refresh_secret(change, name):
    message = f"^{name} must differ from every refresh token secret.$"
    with pytest.raises(ConfigError, match=message):
        load_settings(SECRETS | {"APP_ENV": "production"} | change, LOG)


@pytest.mark.parametrize("change, name", EQUAL_SECRETS, ids=EQUAL_IDS)
def test_development_warns_of_an_access_secret_equal_to_a_refresh_secret(caplog, change, name):
    load_settings(SECRETS | change, LOG)
    assert [record.getMessage() for record in caplog.records] == [
        f"{name} must differ from every refresh token secret. Tokens are still told apart by "
        "their type, but use separate secrets."
    ]


def test_eddsa_in_production_needs_a_private_key_file():
    with pytest.raises(ConfigError, match="^ACCESS_TOKEN_PRIVATE_KEY_FILE is not set"):
        create_app(PRODUCTION | {"ACCESS_TOKEN_ALGORITHM": "EdDSA"})


def test_eddsa_in_production_without_a_key_file_stops_the_process(tmp_path):
    result = run_server(PRODUCTION | {"ACCESS_TOKEN_ALGORITHM": "EdDSA"}, tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ACCESS_TOKEN_PRIVATE_KEY_FILE is not set;")
    assert "Traceback" not in result.stderr


def test_eddsa_in_development_without_a_key_file_warns_and_works(caplog):
    app = create_app({"ACCESS_TOKEN_ALGORITHM": "EdDSA", "REFRESH_TOKEN_SECRET": REFRESH_SECRET})
    assert [record.getMessage() for record in caplog.records if record.name == "server"] == [
        "ACCESS_TOKEN_PRIVATE_KEY_FILE not set: using a key pair made for this process, "
        "so access tokens die with it."
    ]
    actions = AuthActions(app.test_client())
    access = actions.tokens()["accessToken"]
    assert actions.me(access).status_code == 200
    (published,) = app.test_client().get(JWKS_PATH).json["keys"]
    assert jwt.get_unverified_header(access)["kid"] == published["kid"]


def test_with_eddsa_the_access_secret_is_neither_required_nor_used(tmp_path, caplog):
    path, _ = new_key(tmp_path, "access")
    # Production starts without it; one too short to be a secret is not even read.
    for env in (PRODUCTION, PRODUCTION | {"ACCESS_TOKEN_SECRET": "short"}):
        app = create_app(env | eddsa(path) | {"DEMO_USER_PASSWORD": DEMO["password"]})
        assert "ACCESS_TOKEN_SECRET" not in app.config
    # Development makes no random one, so warns only of the refresh secret.
    caplog.clear()
    load_settings({"ACCESS_TOKEN_ALGORITHM": "EdDSA"}, LOG)
    assert [record.getMessage() for record in caplog.records] == [
        "REFRESH_TOKEN_SECRET not set: using random secrets, so tokens die with this process."
    ]
    # An HS256 token under the secret that is set is refused: the secret verifies nothing.
    app = create_app(TEST_CONFIG | eddsa(path))
    live = claims_of(AuthActions(app.test_client()).tokens()["accessToken"])
    token = sign(live, ACCESS_SECRET, "HS256", kid=hmac_kid(ACCESS_SECRET))
    refused_at_me(AuthActions(app.test_client()).me(token), UNKNOWN_KEY)


# --- the JWKS ------------------------------------------------------------------------------


def test_jwks_with_hs256_is_empty(client):
    response = client.get(JWKS_PATH)
    assert (response.status_code, response.json) == (200, {"keys": []})
    assert max_age(response) > 0
    body = response.get_data(as_text=True)
    assert ACCESS_SECRET not in body and REFRESH_SECRET not in body


def test_jwks_with_eddsa_holds_the_public_keys_only(tmp_path):
    current, current_kid = new_key(tmp_path, "current")
    previous, previous_kid = new_key(tmp_path, "previous")
    app = create_app(TEST_CONFIG | eddsa(current, f"{previous}.pub"))
    response = app.test_client().get(JWKS_PATH)
    assert response.status_code == 200
    assert max_age(response) > 0
    keys = response.json["keys"]
    assert [key["kid"] for key in keys] == [current_kid, previous_kid]
    for key, path in zip(keys, (current, previous), strict=True):
        assert key == jwk_of(private_key(path)) | {
            "kid": thumbprint(key),
            "alg": "EdDSA",
            "use": "sig",
        }
    body = response.get_data(as_text=True)
    for path in (current, previous):
        raw = private_key(path).private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        assert b64(raw) not in body  # the JWK `d` of the private key
        with open(path) as file:
            assert all(line not in body for line in file.read().splitlines()[1:-1])
    for secret in (ACCESS_SECRET, REFRESH_SECRET):
        assert secret not in body


# --- introspection (RFC 7662) --------------------------------------------------------------


class Introspection(AuthActions):
    """A user's calls, and a resource server's: POST /introspect as a registered client."""

    def introspect(self, token, hint=None, headers=None, **environ):
        form = {"token": token} | ({"token_type_hint": hint} if hint else {})
        headers = basic() if headers is None else headers
        return self._client.post("/introspect", data=form, headers=headers, **environ)

    def end_session(self, sid, access_token):
        return self._client.delete(f"/sessions/{sid}", headers=bearer(access_token))

    def answer(self, token, **kwargs):
        response = self.introspect(token, **kwargs)
        assert response.status_code == 200, response.json
        return response.json


def introspection(**settings):
    return Introspection(create_app(TEST_CONFIG | CLIENTS | settings).test_client())


def test_introspection_is_off_without_clients(client):
    response = client.post("/introspect", data={"token": "x"}, headers=basic())
    assert (response.status_code, response.json) == (
        404,
        {"error": "not_found", "message": "Token introspection is not enabled on this service."},
    )


BAD_CLIENTS = [
    ("none", {}),
    ("wrong secret", basic(secret="the-wrong-secret-0123456789")),
    ("empty secret", basic(secret="")),
    ("unknown id", basic(client_id="stranger")),
    ("empty id", basic(client_id="")),
    ("not base64", {"Authorization": "Basic !!!not-base64"}),
    ("no secret", {"Authorization": "Basic " + base64.b64encode(b"posts").decode()}),
    ("Bearer", bearer(CLIENT_SECRET)),
]


@pytest.mark.parametrize(
    "headers", [row[1] for row in BAD_CLIENTS], ids=[row[0] for row in BAD_CLIENTS]
)
def test_introspection_refuses_a_bad_client(headers):
    actions = introspection()
    token = actions.tokens()["accessToken"]
    response = actions.introspect(token, headers=headers)
    assert (response.status_code, response.json) == (
        401,
        {
            "error": "invalid_client",
            "message": "Authenticate with HTTP Basic as a client listed in INTROSPECTION_CLIENTS.",
        },
    )
    assert response.headers["WWW-Authenticate"].startswith("Basic ")


FIELDS = ("sub", "sid", "exp", "iat", "jti", "iss", "aud")


@pytest.mark.parametrize("hint", [None, "access_token", "refresh_token", "nonsense"])
@pytest.mark.parametrize(
    "field, token_type", [("accessToken", "access_token"), ("refreshToken", "refresh_token")]
)
def test_introspection_of_a_live_token(field, token_type, hint):
    actions = introspection()
    token = actions.tokens()[field]
    claims = claims_of(token)
    # RFC 7662 §2.1: a hint only orders the search; a wrong one still finds the token.
    assert actions.answer(token, hint=hint) == {
        "active": True,
        "token_type": token_type,
        "client_id": "first-party",  # RFC 7662 §2.2: the client the token was issued to
    } | {name: claims[name] for name in FIELDS}


def expired_access(actions):
    live = claims_of(actions.tokens()["accessToken"])
    return sign(expired(live), ACCESS_SECRET, "HS256", kid=hmac_kid(ACCESS_SECRET))


def expired_refresh(actions):
    live = claims_of(actions.tokens()["refreshToken"])  # the session's current jti
    return sign(expired(live), REFRESH_SECRET, "HS256", "rt+jwt", kid=hmac_kid(REFRESH_SECRET))


def logged_out(name):
    def make(actions):
        tokens = actions.tokens()
        assert actions.logout(tokens["refreshToken"]).status_code == 204
        return tokens[name]

    return make


def ended_by_reuse(name):
    def make(actions):
        first = actions.tokens()
        second = actions.refresh(first["refreshToken"]).json
        with time_machine.travel(time.time() + 11):  # past the grace window: theft
            assert actions.refresh(first["refreshToken"]).status_code == 403
        return second[name]

    return make


def ended_by_its_user(name):
    def make(actions):
        victim, other = actions.tokens(), actions.tokens()
        sid = claims_of(victim["accessToken"])["sid"]
        assert actions.end_session(sid, other["accessToken"]).status_code == 204
        return victim[name]

    return make


def forged(actions):
    live = claims_of(actions.tokens()["accessToken"])
    return sign(live, STRANGER_SECRET, "HS256", kid=hmac_kid(ACCESS_SECRET))


def unknown_kind(actions):
    live = claims_of(actions.tokens()["accessToken"])
    return sign(live, ACCESS_SECRET, "HS256", typ="JWT", kid=hmac_kid(ACCESS_SECRET))


def spent(actions):
    tokens = actions.tokens()
    assert actions.refresh(tokens["refreshToken"]).status_code == 200
    return tokens["refreshToken"]  # within the grace window, yet no longer the current one


# fmt: off
DEAD_TOKENS = [
    ("expired access token", expired_access),
    ("expired refresh token", expired_refresh),
    ("access token, logged out", logged_out("accessToken")),
    ("refresh token, logged out", logged_out("refreshToken")),
    ("access token, session ended by reuse", ended_by_reuse("accessToken")),
    ("refresh token, session ended by reuse", ended_by_reuse("refreshToken")),
    ("access token, DELETE /sessions/{id}", ended_by_its_user("accessToken")),
    ("refresh token, DELETE /sessions/{id}", ended_by_its_user("refreshToken")),
    ("forged", forged),
    ("unknown kind", unknown_kind),
    ("garbage", lambda actions: "not-a-token"),
    ("refresh token no longer current", spent),
]
# fmt: on


@pytest.mark.parametrize(
    "make_token", [row[1] for row in DEAD_TOKENS], ids=[row[0] for row in DEAD_TOKENS]
)
@pytest.mark.parametrize("hint", [None, "refresh_token"])
def test_introspection_of_a_dead_token_says_only_inactive(make_token, hint):
    actions = introspection()
    assert actions.answer(make_token(actions), hint=hint) == INACTIVE


def test_introspection_spends_and_ends_nothing():
    actions = introspection(REFRESH_REUSE_GRACE="0")  # a second use would be reuse
    tokens = actions.tokens()
    for _ in range(2):
        assert actions.answer(tokens["accessToken"])["active"] is True
        assert actions.answer(tokens["refreshToken"])["active"] is True
    assert actions.me(tokens["accessToken"]).status_code == 200
    response = actions.refresh(tokens["refreshToken"])
    assert response.status_code == 200
    assert actions.answer(response.json["refreshToken"])["active"] is True
    assert actions.answer(tokens["refreshToken"]) == INACTIVE  # spent by the refresh, not before


def test_failed_client_authentication_is_throttled():
    actions = introspection(LOGIN_RATE_LIMIT="3 per minute")
    token = actions.tokens()["accessToken"]
    wrong = basic(secret="the-wrong-secret-0123456789")
    for _ in range(3):
        assert actions.introspect(token, headers=wrong).status_code == 401
    for headers in (wrong, basic()):  # the right secret too, for this client from here
        response = actions.introspect(token, headers=headers)
        assert response.status_code == 429
        assert response.json["error"] == "too_many_requests"
        assert 1 <= int(response.headers["Retry-After"]) <= 61
    # Another client, or this one from another address, is not locked out.
    assert actions.answer(token, headers=basic("billing", "billing-secret-0123"))["active"]
    assert actions.answer(token, environ_base={"REMOTE_ADDR": "192.0.2.7"})["active"]


def test_successful_client_authentication_is_not_counted():
    actions = introspection(LOGIN_RATE_LIMIT="3 per minute")
    token = actions.tokens()["accessToken"]
    for _ in range(6):
        assert actions.answer(token)["active"] is True


def test_a_clients_own_calls_at_the_same_moment_are_never_throttled(
    start_server, redis_url, redis_client
):
    # Only failures count: a busy resource server's parallel checks must all get through.
    url = start_server(
        **TEST_CONFIG, REDIS_URL=redis_url, LOGIN_RATE_LIMIT="3 per minute",
        INTROSPECTION_CLIENTS="posts:posts-secret-0123456789",
    )  # fmt: skip
    access = call(url, "POST", "/login", DEMO)[2]["accessToken"]
    request = urllib.request.Request(
        url + "/introspect",
        data=urllib.parse.urlencode({"token": access}).encode(),
        headers={
            "Authorization": "Basic " + base64.b64encode(b"posts:posts-secret-0123456789").decode()
        },
    )

    def introspect(_):
        with urllib.request.urlopen(request) as response:
            return response.status, json.load(response)["active"]

    assert released_together(24, introspect) == [(200, True)] * 24


def test_throttled_client_is_let_in_again_after_the_window():
    start = time.time()
    with time_machine.travel(start, tick=False):
        actions = introspection(LOGIN_RATE_LIMIT="3 per minute")
        token = actions.tokens()["accessToken"]
        for _ in range(3):
            actions.introspect(token, headers=basic(secret="the-wrong-secret-0123456789"))
        assert actions.introspect(token).status_code == 429
    with time_machine.travel(start + 61, tick=False):
        assert actions.answer(token)["active"] is True


# --- end to end: the auth service and the tutorial's second service, as processes ----------


@contextlib.contextmanager
def resource_server(tmp_path, **settings):
    """Run examples/resource_server.py on a free port until the block ends; yield its URL."""
    port = free_port()
    command = [sys.executable, str(ROOT / "examples" / "resource_server.py")]
    env = user_env(PORT=str(port), **settings)
    with serve(command, env, tmp_path, port) as (url, _):
        yield url


def test_a_second_service_trusts_our_tokens(start_server, tmp_path):
    path, kid = new_key(tmp_path, "access")
    auth = start_server(
        ACCESS_TOKEN_ALGORITHM="EdDSA", ACCESS_TOKEN_PRIVATE_KEY_FILE=path, **CLIENTS
    )
    common = {"AUTH_SERVER_URL": auth, "ACCESS_TOKEN_ALGORITHM": "EdDSA"}
    asks = {"INTROSPECT": "1", "INTROSPECTION_CLIENT_ID": CLIENT_ID}
    asks["INTROSPECTION_CLIENT_SECRET"] = CLIENT_SECRET
    with (
        resource_server(tmp_path, **common) as offline,
        resource_server(tmp_path, **common, **asks) as asking,
    ):
        tokens = call(auth, "POST", "/login", DEMO)[2]
        token = tokens["accessToken"]
        assert jwt.get_unverified_header(token)["kid"] == kid
        for server in (offline, asking):
            status, _, body = call(server, "GET", "/posts", token=token)
            assert (status, body) == (200, POST_1)
        assert call(auth, "POST", "/logout", {"refreshToken": tokens["refreshToken"]})[0] == 204
        # Introspection is current: the logout takes effect at once.
        status, _, body = call(asking, "GET", "/posts", token=token)
        assert (status, body["message"]) == (
            401,
            "The access token is not valid: the auth service says it is not a live access token.",
        )
        # Offline checking is fast but not current: the token stays good until it expires
        # (docs/keys.md states this trade-off)...
        status, _, body = call(offline, "GET", "/posts", token=token)
        assert (status, body) == (200, POST_1)
        # ...and then it is refused: the same claims, past their expiry.
        late = sign(expired(claims_of(token)), private_key(path), "EdDSA", kid=kid)
        status, _, body = call(offline, "GET", "/posts", token=late)
        assert (status, body["message"]) == (
            401,
            "The access token is not valid: signature has expired.",
        )


def test_made_up_client_ids_cost_no_memory(redis_url, redis_client):
    # Only clients that exist get counters: a flood of long, new ids adds none.
    app = create_app(
        TEST_CONFIG
        | {"REDIS_URL": redis_url, "INTROSPECTION_CLIENTS": "posts:posts-secret-0123456789"}
    )
    client = app.test_client()
    for n in range(50):
        made_up = basic(f"{n}{'A' * 5000}", "whatever")
        assert client.post("/introspect", data={"token": "x"}, headers=made_up).status_code in (
            401,
            429,
        )
    keys = redis_client.keys("LIMITS*")
    assert len(keys) == 1 and all(len(key) < 200 for key in keys)  # the address's, only


def test_a_removed_accounts_tokens_are_inactive_everywhere(tmp_path):
    users_file = tmp_path / "users.txt"
    from users import hash_password

    users_file.write_text(f"bob@example.com:{hash_password('bob password')}\n")
    config = TEST_CONFIG | {
        "USERS_FILE": str(users_file),
        "INTROSPECTION_CLIENTS": "posts:posts-secret-0123456789",
    }
    first = create_app(config)
    tokens = (
        first.test_client()
        .post("/login", json={"email": "bob@example.com", "password": "bob password"})
        .json
    )
    users_file.write_text("")  # bob is removed, and the service restarted with the same store
    second = create_app(config)
    second.extensions["store"] = first.extensions["store"]
    client = second.test_client()
    bearer = {"Authorization": f"Bearer {tokens['accessToken']}"}
    assert client.get("/me", headers=bearer).status_code == 401
    assert client.get("/sessions", headers=bearer).status_code == 401
    for token in (tokens["accessToken"], tokens["refreshToken"]):
        answer = client.post(
            "/introspect", data={"token": token}, headers=basic("posts", "posts-secret-0123456789")
        )
        assert answer.json == {"active": False}


# --- introspection clients: counted first, credentials decoded, bodies bounded ------------


def test_wrong_client_secrets_sent_at_once_are_each_counted(start_cluster):
    # RFC 6749 §2.3.1 and NIST SP 800-63B §5.2.2: count, atomically, before answering.
    url, _ = start_cluster(LOGIN_RATE_LIMIT="3 per minute", **CLIENTS)
    access = call(url, "POST", "/login", DEMO)[2]["accessToken"]
    form = urllib.parse.urlencode({"token": access}).encode()
    wrong = basic(secret="the-wrong-secret-0123456789")

    def introspect(_):
        request = urllib.request.Request(url + "/introspect", data=form, headers=wrong)
        try:
            with urllib.request.urlopen(request) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    assert sorted(released_together(32, introspect)) == [401] * 3 + [429] * 29


SPECIAL_SECRET = "a+b/c=d&e%f 0123456789"  # every character RFC 6749 §2.3.1 encodes


def test_client_credentials_are_form_urlencoded_as_rfc_6749_says():
    clients = {"INTROSPECTION_CLIENTS": f"posts:{SPECIAL_SECRET},plain:plain-secret-0123456789"}
    actions = Introspection(create_app(TEST_CONFIG | clients).test_client())
    token = actions.tokens()["accessToken"]
    encoded = urllib.parse.quote_plus(SPECIAL_SECRET)
    assert actions.answer(token, headers=basic("posts", encoded))["active"] is True
    # A raw secret that decodes to itself keeps working; one that does not is refused.
    assert actions.answer(token, headers=basic("plain", "plain-secret-0123456789"))["active"]
    assert actions.introspect(token, headers=basic("posts", SPECIAL_SECRET)).status_code == 401
    # The client id is decoded too.
    clients = {"INTROSPECTION_CLIENTS": "my client:its-secret-0123456789"}
    actions = Introspection(create_app(TEST_CONFIG | clients).test_client())
    headers = basic("my+client", "its-secret-0123456789")
    assert actions.answer(actions.tokens()["accessToken"], headers=headers)["active"] is True


@pytest.fixture(scope="module", params=["python server.py", "granian"])
def introspecting_server(request, tmp_path_factory):
    """Each kind of server, one for both framings of the test below."""
    port = free_port()
    if request.param == "python server.py":
        command = [sys.executable, str(ROOT / "server.py")]
        env = user_env(PORT=str(port), **CLIENTS)
    else:
        env = user_env(**TEST_CONFIG, **CLIENTS, DEMO_USER_PASSWORD=DEMO["password"])
        command = [
            sys.executable, "-m", "granian", "--interface", "wsgi", "--factory",
            "--workers", "1", "--host", "127.0.0.1", "--port", str(port), "server:create_app",
        ]  # fmt: skip
    with serve(command, env, tmp_path_factory.mktemp("introspecting"), port) as (url, _):
        yield url


@pytest.mark.parametrize("padding_first", [False, True])
def test_a_form_over_64_kib_is_413_however_it_is_framed(introspecting_server, padding_first):
    # RFC 9110 §15.5.14: a body over the bound is refused whole, never cut and parsed.
    url = introspecting_server
    access = call(url, "POST", "/login", DEMO)[2]["accessToken"]
    fields = [f"token={access}", "pad=" + "x" * 100_000]
    body = "&".join(reversed(fields) if padding_first else fields).encode()
    credentials = basic()["Authorization"].encode()
    head = (
        b"POST /introspect HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Authorization: " + credentials
    )
    chunks = [body[i : i + 8192] for i in range(0, len(body), 8192)]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    for framing, payload in (
        (b"Transfer-Encoding: chunked", chunked),
        (b"Content-Length: %d" % len(body), body),
    ):
        answer = raw_answer(url, head + b"\r\n" + framing, payload)
        assert answer.split(b"\r\n", 1)[0].split()[1] == b"413", (framing, answer[:200])


def raw_answer(url, head, body):
    """Send bytes as they are; return the answer's head."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
        with contextlib.suppress(OSError):  # a server may answer and close before the end
            sock.sendall(body)
        answer = b""
        while b"\r\n\r\n" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
    return answer
