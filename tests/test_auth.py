import time

import jwt
import pytest

from auth import ACCESS, REFRESH, InvalidToken, Tokens
from keys import hmac_kid, hmac_ring
from store import Policy

from .conftest import ACCESS_SECRET, REFRESH_SECRET

NOW = 1_800_000_000
OLD_ACCESS = "an-old-access-secret-0123456789abcdef"
# RFC 9068 §2.2: the claims every JWT access token must carry.
RFC_9068_CLAIMS = {"iss", "exp", "aud", "sub", "client_id", "iat", "jti"}


def make_tokens(access=ACCESS_SECRET, refresh=REFRESH_SECRET, previous=()):
    return Tokens(
        hmac_ring(access, list(previous)), hmac_ring(refresh, []), 900, "issuer", "audience", 5
    )


@pytest.fixture
def tokens():
    return make_tokens()


def session(now=NOW, lifetime=86_400):
    return Policy(lifetime=lifetime).new_session("7", now, "curl/8", "127.0.0.1")


def unverified(token):
    return jwt.get_unverified_header(token), jwt.decode(token, options={"verify_signature": False})


def test_access_token_claims(tokens):
    s = session()
    token, expires_in = tokens.issue_access(s, NOW)
    header, claims = unverified(token)
    assert header == {"alg": "HS256", "typ": "at+jwt", "kid": hmac_kid(ACCESS_SECRET)}
    assert claims.keys() == RFC_9068_CLAIMS | {"sid"}
    assert (claims["sub"], claims["sid"], claims["iat"], claims["exp"], claims["client_id"]) == (
        "7",
        s.id,
        NOW,
        NOW + 900,
        "first-party",
    )
    assert expires_in == 900


def test_an_access_token_never_outlives_its_session(tokens):
    s = session(lifetime=60)
    token, expires_in = tokens.issue_access(s, NOW)
    assert unverified(token)[1]["exp"] == s.expires_at == NOW + 60
    assert expires_in == 60


def test_refresh_token_claims(tokens):
    s = session()
    token = tokens.issue_refresh(s)
    header, claims = unverified(token)
    assert header == {"alg": "HS256", "typ": "rt+jwt", "kid": hmac_kid(REFRESH_SECRET)}
    assert "fam" not in claims
    assert (claims["jti"], claims["sid"], claims["iat"], claims["exp"]) == (
        s.jti,
        s.id,
        s.last_used_at,
        s.expires_at,
    )


def test_a_refresh_token_is_minted_the_same_each_time(tokens):
    s = session()
    assert tokens.issue_refresh(s) == tokens.issue_refresh(s)


def test_each_kind_is_signed_with_its_own_secret(tokens):
    s = session()
    access, _ = tokens.issue_access(s, NOW)
    options = {"verify_exp": False, "verify_iat": False, "verify_aud": False}
    jwt.decode(access, ACCESS_SECRET, algorithms=["HS256"], options=options)
    jwt.decode(tokens.issue_refresh(s), REFRESH_SECRET, algorithms=["HS256"], options=options)
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(access, REFRESH_SECRET, algorithms=["HS256"], options=options)


def test_token_ids_are_unique_within_a_second(tokens):
    assert tokens.issue_access(session(), NOW) != tokens.issue_access(session(), NOW)


def test_decode_round_trip(tokens):
    now = int(time.time())
    s = session(now)
    assert tokens.decode(tokens.issue_access(s, now)[0], ACCESS)["sid"] == s.id
    assert tokens.decode(tokens.issue_refresh(s), REFRESH)["jti"] == s.jti


def test_expired_token_is_invalid(tokens):
    expired, _ = tokens.issue_access(session(int(time.time()) - 10_000), int(time.time()) - 10_000)
    with pytest.raises(InvalidToken, match="The token has expired"):
        tokens.decode(expired, ACCESS)


@pytest.mark.parametrize(
    "wanted, shown, message",
    [
        (ACCESS, REFRESH, "This is a refresh token; send an access token."),
        (REFRESH, ACCESS, "This is an access token; send a refresh token."),
    ],
)
def test_the_wrong_kind_says_which_kind_to_send(tokens, wanted, shown, message):
    s = session(int(time.time()))
    token = tokens.issue_access(s, s.created_at)[0] if shown == ACCESS else tokens.issue_refresh(s)
    with pytest.raises(InvalidToken) as refused:
        tokens.decode(token, wanted)
    assert str(refused.value) == message


def test_tokens_of_a_previous_secret_verify_and_new_ones_use_the_new_secret():
    s = session(int(time.time()))
    old_token, _ = make_tokens(access=OLD_ACCESS).issue_access(s, s.created_at)
    rotated = make_tokens(previous=[OLD_ACCESS])
    assert rotated.decode(old_token, ACCESS)["sid"] == s.id
    new_token, _ = rotated.issue_access(s, s.created_at)
    assert jwt.get_unverified_header(new_token)["kid"] == hmac_kid(ACCESS_SECRET)
    with pytest.raises(InvalidToken, match="a key this service does not hold"):
        make_tokens().decode(old_token, ACCESS)  # the old secret removed: retired
