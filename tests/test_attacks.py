"""Play the attacker: every row is a forged or broken token that must be refused.

The attacks come from RFC 8725 (JWT Best Current Practices), RFC 7515 §4.1.11 (crit), and the
cases PyJWT's and Flask-JWT-Extended's own suites check. Each runs twice: as an access token
at GET /me (401) and as a refresh token at POST /token (403).
"""

import base64
import json
import time
import warnings

import jwt
import pytest
from jwt.warnings import InsecureKeyLengthWarning

from keys import hmac_kid
from server import create_app

from .conftest import ACCESS_SECRET, DEMO, REFRESH_SECRET, TEST_CONFIG

SECRETS = {"access": ACCESS_SECRET, "refresh": REFRESH_SECRET}
TYP = {"access": "at+jwt", "refresh": "rt+jwt"}


def b64(data):
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def claims(kind, **changes):
    """Valid claims for a token of this kind, with some changed (None removes a claim)."""
    now = int(time.time())
    payload = {"iss": "jwt-refresh-service", "aud": "jwt-refresh-service", "sub": "1"}
    payload |= {"iat": now, "exp": now + 900, "jti": "attack-jti", "sid": "attack-session"}
    payload |= changes
    return {key: value for key, value in payload.items() if value is not None}


def sign(kind, payload=None, key=None, algorithm="HS256", **headers):
    """A token signed like ours unless told otherwise."""
    headers = {"typ": TYP[kind], "kid": hmac_kid(SECRETS[kind])} | headers
    headers = {key: value for key, value in headers.items() if value is not None}
    payload = claims(kind) if payload is None else payload
    with warnings.catch_warnings():  # an attacker does not mind a short key for HS384/HS512
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return jwt.encode(payload, key or SECRETS[kind], algorithm, headers=headers)


def unsigned(kind, alg):
    """An `alg: none` token: header and payload, empty signature (RFC 8725 §2.1)."""
    header = {"alg": alg, "typ": TYP[kind], "kid": hmac_kid(SECRETS[kind])}
    return f"{b64(header)}.{b64(claims(kind))}."


def tampered(kind):
    """Our valid token with its payload swapped for another user's (RFC 8725 §2.1)."""
    header, _, signature = sign(kind).split(".")
    return f"{header}.{b64(claims(kind, sub='2'))}.{signature}"


def now():
    return int(time.time())


# Our own words for each refusal: none of them repeats what the attacker put in the token.
NOT_ALLOWED = "The token is signed with an algorithm this service refuses."
BAD_SIGNATURE = "The token's signature does not match."
MALFORMED = "The token is malformed."
NOT_VALID = "The token is not valid."
UNKNOWN_KEY = "The token is signed with a key this service does not hold."
KEY_POINTER = "The token's header points at a key; this service never uses one."
WRONG_KIND = "This is not {kind} token."
OTHER_KIND = "This is {other} token; send {kind} token."
ATTACKER_KEY = "an-attacker-guessed-this-secret-000"


def missing(claim):
    return f"The token lacks the '{claim}' claim."


def other_key(kind):
    return SECRETS["refresh" if kind == "access" else "access"]


# fmt: off
ATTACKS = [
    # RFC 8725 §2.1, §3.1: "none" in any spelling is never an accepted algorithm.
    ("alg none", lambda k: unsigned(k, "none"), NOT_ALLOWED),
    ("alg None", lambda k: unsigned(k, "None"), NOT_ALLOWED),
    ("alg NONE", lambda k: unsigned(k, "NONE"), NOT_ALLOWED),
    ("alg nOnE", lambda k: unsigned(k, "nOnE"), NOT_ALLOWED),
    # RFC 8725 §3.1: the algorithm is ours to choose, not the token's.
    ("re-signed HS384", lambda k: sign(k, algorithm="HS384"), NOT_ALLOWED),
    ("re-signed HS512", lambda k: sign(k, algorithm="HS512"), NOT_ALLOWED),
    # RFC 7515 §5.2: the signature covers header and payload.
    ("stripped signature", lambda k: sign(k).rsplit(".", 1)[0] + ".", BAD_SIGNATURE),
    ("tampered payload", tampered, BAD_SIGNATURE),
    ("wrong key", lambda k: sign(k, key=ATTACKER_KEY), BAD_SIGNATURE),
    ("other kind's key", lambda k: sign(k, key=other_key(k)), BAD_SIGNATURE),
    # RFC 7515 §4.1.4: the kid names one of our keys, or the token is refused.
    ("missing kid", lambda k: sign(k, kid=None), UNKNOWN_KEY),
    ("unknown kid", lambda k: sign(k, kid="not-one-of-ours"), UNKNOWN_KEY),
    ("kid not a string", lambda k: f"{b64({'alg': 'HS256', 'typ': TYP[k], 'kid': ['a']})}."
     + sign(k).split(".", 1)[1], MALFORMED),
    ("other kind's kid", lambda k: sign(k, kid=hmac_kid(other_key(k))), UNKNOWN_KEY),
    ("attacker's key, named by its own kid",
     lambda k: sign(k, key=ATTACKER_KEY, kid=hmac_kid(ATTACKER_KEY)), UNKNOWN_KEY),
    # RFC 7519 §4.1: the claims we rely on are present and well typed.
    ("expired", lambda k: sign(k, claims(k, iat=now() - 999, exp=now() - 99)),
     "The token has expired."),
    ("exp not a number", lambda k: sign(k, claims(k, exp="never")), MALFORMED),
    ("missing exp", lambda k: sign(k, claims(k, exp=None)), missing("exp")),
    ("missing iat", lambda k: sign(k, claims(k, iat=None)), missing("iat")),
    ("missing sub", lambda k: sign(k, claims(k, sub=None)), missing("sub")),
    ("missing sid", lambda k: sign(k, claims(k, sid=None)), missing("sid")),
    ("missing jti", lambda k: sign(k, claims(k, jti=None)), missing("jti")),
    ("sub not a string", lambda k: sign(k, claims(k, sub=1)), NOT_VALID),
    # RFC 7515 §7.1: a compact JWS is exactly three base64url parts.
    ("two parts", lambda k: sign(k).rsplit(".", 1)[0], MALFORMED),
    ("four parts", lambda k: sign(k) + ".extra", MALFORMED),
    ("not base64url", lambda k: "!!!." + sign(k).split(".", 1)[1], MALFORMED),
    ("header not an object", lambda k: b64(b"[1]") + "." + sign(k).split(".", 1)[1], MALFORMED),
    ("non-ASCII in the token", lambda k: sign(k)[:-4] + "\u00e9\u00e9\u00e9\u00e9", MALFORMED),
    # RFC 8725 §3.1: bound the input before any work is done on it.
    ("over 8 KiB", lambda k: sign(k, claims(k, pad="x" * 9000)),
     "The token is longer than any token this service issues."),
    # RFC 7519 §4.1.5-4.1.6: not valid yet, beyond the leeway.
    ("nbf in the future", lambda k: sign(k, claims(k, nbf=now() + 60)),
     "The token is not valid yet."),
    ("iat in the future", lambda k: sign(k, claims(k, iat=now() + 60)),
     "The token is not valid yet."),
    # RFC 8725 §3.8-3.9: issued by us, for us.
    ("wrong iss", lambda k: sign(k, claims(k, iss="https://evil.example")),
     "The token was not issued by this service."),
    ("missing iss", lambda k: sign(k, claims(k, iss=None)), missing("iss")),
    ("wrong aud", lambda k: sign(k, claims(k, aud="another-service")),
     "The token is not meant for this service."),
    ("missing aud", lambda k: sign(k, claims(k, aud=None)), missing("aud")),
    # RFC 8725 §3.10: keys are never taken from, or fetched for, a header.
    ("jwk header", lambda k: sign(k, jwk={"kty": "oct", "k": b64(b"k" * 32)}), KEY_POINTER),
    ("jku header", lambda k: sign(k, jku="https://evil.example/keys"), KEY_POINTER),
    ("x5u header", lambda k: sign(k, x5u="https://evil.example/cert.pem"), KEY_POINTER),
    ("x5c header", lambda k: sign(k, x5c=["MIIB"]), KEY_POINTER),
    # RFC 7515 §4.1.11: an extension we do not understand must not be ignored; its name is
    # the attacker's, so the answer does not repeat it.
    ("unknown crit", lambda k: sign(k, crit=["<script>"], **{"<script>": 1}), MALFORMED),
    # RFC 8725 §3.11: explicit typing, so one kind never passes for another.
    ("missing typ", lambda k: sign(k, typ=None), WRONG_KIND),
    ("plain JWT typ", lambda k: sign(k, typ="JWT"), WRONG_KIND),
    ("the other kind's typ", lambda k: sign(k, typ=TYP["refresh" if k == "access" else "access"]),
     OTHER_KIND),
]
# fmt: on


@pytest.mark.parametrize("kind", ["access", "refresh"])
@pytest.mark.parametrize(
    "make_token, reason", [a[1:] for a in ATTACKS], ids=[a[0] for a in ATTACKS]
)
def test_attack_is_refused(client, kind, make_token, reason):
    token = make_token(kind)
    names = {"access": "an access", "refresh": "a refresh"}
    other = names["refresh" if kind == "access" else "access"]
    reason = reason.format(kind=names[kind], other=other)
    if kind == "access":
        response = client.get("/me", headers={"Authorization": f"Bearer {token}"})
        expected = {
            "error": "invalid_token",
            "message": f"The access token is not valid: {reason} "
            "Log in or refresh to get a new one.",
        }
        assert (response.status_code, response.json) == (401, expected)
        assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    else:
        response = client.post("/token", json={"refreshToken": token})
        expected = {
            "error": "invalid_refresh_token",
            "message": f"The refresh token is not valid: {reason} Log in again.",
        }
        assert (response.status_code, response.json) == (403, expected)


def test_a_well_formed_token_is_accepted(client):
    """The control row: the same builders, unmodified, make a token /me accepts."""
    issued = jwt.decode(
        client.post("/login", json=DEMO).json["accessToken"], options={"verify_signature": False}
    )
    token = sign("access", claims("access", sub=issued["sub"], sid=issued["sid"]))
    assert client.get("/me", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_no_refusal_repeats_what_the_attacker_wrote(client):
    """RFC 8725 §3.10 spirit: a message never echoes an unverified value from a header."""
    marker = "ATTACKER-MARKER"
    for headers in (
        {"kid": marker},
        {"typ": marker},
        {"alg": marker},
        {"crit": [marker], marker: 1},
    ):
        token = sign("access", **{k: v for k, v in headers.items() if k != "alg"})
        if "alg" in headers:
            token = f"{b64({'alg': marker, 'typ': TYP['access']})}.{b64(claims('access'))}.x"
        for response in (
            client.get("/me", headers={"Authorization": f"Bearer {token}"}),
            client.post("/token", json={"refreshToken": token}),
        ):
            assert response.status_code in (401, 403)
            assert marker not in response.get_data(as_text=True)


@pytest.fixture
def equal_secrets_client():
    """Both kinds signed with one key: allowed in development, and typing still holds."""
    return create_app(TEST_CONFIG | {"REFRESH_TOKEN_SECRET": ACCESS_SECRET}).test_client()


def test_access_token_is_refused_at_token_even_with_equal_secrets(equal_secrets_client):
    tokens = equal_secrets_client.post("/login", json=DEMO).json
    response = equal_secrets_client.post("/token", json={"refreshToken": tokens["accessToken"]})
    assert (response.status_code, response.json) == (
        403,
        {
            "error": "invalid_refresh_token",
            "message": "The refresh token is not valid: This is an access token; "
            "send a refresh token. Log in again.",
        },
    )


def test_refresh_token_is_refused_at_me_even_with_equal_secrets(equal_secrets_client):
    tokens = equal_secrets_client.post("/login", json=DEMO).json
    response = equal_secrets_client.get(
        "/me", headers={"Authorization": f"Bearer {tokens['refreshToken']}"}
    )
    assert response.status_code == 401
    assert response.json == {
        "error": "invalid_token",
        "message": "The access token is not valid: This is a refresh token; "
        "send an access token. Log in or refresh to get a new one.",
    }
