import time

import jwt
import pytest
from werkzeug.security import check_password_hash

import auth
from auth import ACCESS, REFRESH, InvalidToken, Tokens, Users

from .conftest import ACCESS_SECRET, REFRESH_SECRET

NOW = 1_800_000_000


@pytest.fixture
def tokens():
    return Tokens(ACCESS_SECRET, REFRESH_SECRET, 900, "issuer", "audience", 5)


def test_access_token_claims(tokens):
    token = tokens.issue_access("7", NOW)
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert header == {"alg": "HS256", "typ": "at+jwt"}
    assert claims.keys() == {"iss", "aud", "sub", "iat", "exp", "jti"}
    assert (claims["sub"], claims["iat"], claims["exp"]) == ("7", NOW, NOW + 900)


def test_refresh_token_claims(tokens):
    token = tokens.issue_refresh("7", "family", "the-jti", NOW + 100, NOW)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert jwt.get_unverified_header(token)["typ"] == "rt+jwt"
    assert (claims["jti"], claims["fam"], claims["exp"]) == ("the-jti", "family", NOW + 100)


def test_each_kind_is_signed_with_its_own_secret(tokens):
    access = tokens.issue_access("7", NOW)
    refresh = tokens.issue_refresh("7", "family", "jti", NOW + 100, NOW)
    options = {"verify_exp": False, "verify_iat": False, "verify_aud": False}
    jwt.decode(access, ACCESS_SECRET, algorithms=["HS256"], options=options)
    jwt.decode(refresh, REFRESH_SECRET, algorithms=["HS256"], options=options)
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(access, REFRESH_SECRET, algorithms=["HS256"], options=options)


def test_token_ids_are_unique_within_a_second(tokens):
    assert tokens.issue_access("7", NOW) != tokens.issue_access("7", NOW)


def test_decode_round_trip(tokens):
    now = int(time.time())
    assert tokens.decode(tokens.issue_access("7", now), ACCESS)["sub"] == "7"
    refresh = tokens.issue_refresh("7", "family", "jti", now + 100, now)
    assert tokens.decode(refresh, REFRESH)["fam"] == "family"


def test_expired_token_is_invalid(tokens):
    expired = tokens.issue_access("7", int(time.time()) - 10_000)  # minted already expired
    with pytest.raises(InvalidToken, match="Signature has expired"):
        tokens.decode(expired, ACCESS)


def test_passwords_are_hashed_with_the_owasp_parameters(monkeypatch):
    monkeypatch.setattr(auth, "PASSWORD_HASH_METHOD", "scrypt:32768:8:3")
    user = Users().add("Demo@Example.com", "secret password")
    assert user.password_hash.startswith("scrypt:32768:8:3$")
    assert "secret password" not in user.password_hash
    assert check_password_hash(user.password_hash, "secret password")


def test_emails_match_case_insensitively():
    users = Users()
    user = users.add("Demo@Example.com", "pw")
    assert users.authenticate("DEMO@example.COM", "pw") == user
    assert users.authenticate("demo@example.com", "wrong") is None


def test_unknown_email_costs_one_hash_check_like_a_wrong_password(monkeypatch):
    users = Users()
    users.add("demo@example.com", "pw")
    checked = []
    real_check = auth.check_password_hash
    monkeypatch.setattr(
        auth, "check_password_hash", lambda h, p: checked.append(h) or real_check(h, p)
    )
    assert users.authenticate("nobody@example.com", "pw") is None
    assert users.authenticate("demo@example.com", "wrong") is None
    assert len(checked) == 2
    assert checked[0].split("$")[0] == checked[1].split("$")[0]  # same method and parameters


def test_a_key_pyjwt_refuses_is_an_invalid_token_not_a_crash(tokens):
    pem_key = (
        "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----"
    )
    confused = Tokens(pem_key, pem_key, 900, "issuer", "audience", 5)
    with pytest.raises(InvalidToken, match="asymmetric key"):
        confused.decode(tokens.issue_access("7", int(time.time())), ACCESS)
