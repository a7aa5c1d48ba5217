import base64
import logging
import stat
from pathlib import Path

import jwt
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from jwt.algorithms import OKPAlgorithm
from jwt.api_jws import _jws_global_obj

from keys import CheckedOnceHMAC, cli, eddsa_ring, hmac_kid, hmac_ring, thumbprint
from settings import ConfigError

SECRET = "current-secret-0123456789abcdefghij"
OLD_SECRET = "previous-secret-0123456789abcdefghi"
LOG = logging.getLogger("test_keys")
# RFC 8037 Appendix A.1 (an Ed25519 key) and A.3 (its RFC 7638 thumbprint).
RFC8037_D = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"
RFC8037_X = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
RFC8037_THUMBPRINT = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def rfc8037_key():
    return Ed25519PrivateKey.from_private_bytes(base64.urlsafe_b64decode(RFC8037_D + "="))


def private_pem(key, encryption=None):
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, encryption or NoEncryption())


def public_pem(key):
    return key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def kid_of(key):
    """The RFC 7638 thumbprint of a key, from the JWK PyJWT makes of it."""
    return thumbprint(OKPAlgorithm.to_jwk(key.public_key(), as_dict=True))


def shows_no_key(text, pem):
    """True if no line of the PEM file, armour or body, appears in the text."""
    return all(line not in text for line in (pem or b"").decode().splitlines() if len(line) > 4)


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_hmac_kid_is_stable_short_and_hides_the_secret():
    kid = hmac_kid(SECRET)
    assert kid == hmac_kid(SECRET)
    assert len(kid) == 16
    assert kid not in SECRET
    assert hmac_kid(OLD_SECRET) != kid


def test_hmac_ring_signs_with_the_current_secret_and_verifies_with_both():
    ring = hmac_ring(SECRET, [OLD_SECRET])
    assert ring.algorithm == "HS256"
    assert ring.find(hmac_kid(SECRET)) is ring.current
    assert ring.current.private == ring.current.public == SECRET
    old = ring.find(hmac_kid(OLD_SECRET))
    assert old.public == OLD_SECRET
    assert old.private is None  # verify-only: a previous secret never signs
    assert [key.kid for key in ring.keys] == [hmac_kid(SECRET), hmac_kid(OLD_SECRET)]


def test_hmac_ring_publishes_no_key():
    assert hmac_ring(SECRET, [OLD_SECRET]).jwks() == {"keys": []}


def test_thumbprint_is_the_rfc_8037_value():
    assert thumbprint({"kty": "OKP", "crv": "Ed25519", "x": RFC8037_X}) == RFC8037_THUMBPRINT


def test_private_and_public_pem_give_the_same_kid(tmp_path):
    key = rfc8037_key()
    private = write(tmp_path, "key.pem", private_pem(key))
    public = write(tmp_path, "key.pem.pub", public_pem(key))
    ring = eddsa_ring(private, [public], LOG, allow_generated=False)
    assert ring.algorithm == "EdDSA"
    assert ring.current.kid == RFC8037_THUMBPRINT
    assert ring.find(RFC8037_THUMBPRINT) is ring.current  # the signing key wins the tie
    assert [key.kid for key in ring.keys] == [RFC8037_THUMBPRINT]


@pytest.fixture
def rotated(tmp_path):
    """The old key, and a ring where a new key signs and the old one's public PEM verifies."""
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    private = write(tmp_path, "new.pem", private_pem(new))
    previous = write(tmp_path, "old.pem.pub", public_pem(old))
    return old, eddsa_ring(private, [previous], LOG, allow_generated=False)


def test_previous_key_verifies_old_tokens_and_never_signs(rotated):
    old, ring = rotated
    previous = ring.find(kid_of(old))
    assert previous.private is None
    assert ring.current.kid != previous.kid
    token = jwt.encode({"sub": "1"}, old, "EdDSA", headers={"kid": previous.kid})
    assert jwt.decode(token, previous.public, algorithms=[ring.algorithm]) == {"sub": "1"}


def test_signing_key_signs_what_its_public_jwk_verifies(rotated):
    _, ring = rotated
    token = jwt.encode({"sub": "1"}, ring.current.private, ring.algorithm)
    public = jwt.PyJWK.from_dict(ring.current.public_jwk)
    assert jwt.decode(token, public, algorithms=["EdDSA"]) == {"sub": "1"}
    assert ring.current.kid == kid_of(ring.current.private)


@pytest.mark.parametrize("kid", ["unknown", "", None, 7, ["x"], {"kid": "x"}])
def test_find_returns_none_for_any_other_kid(rotated, kid):
    _, ring = rotated
    assert ring.find(kid) is None


def test_jwks_holds_the_public_members_of_every_key_and_nothing_private(rotated):
    old, ring = rotated
    jwks = ring.jwks()
    assert [jwk["kid"] for jwk in jwks["keys"]] == [ring.current.kid, kid_of(old)]
    for jwk in jwks["keys"]:
        assert jwk.keys() == {"kty", "crv", "x", "kid", "alg", "use"}
        assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["use"]) == (
            "OKP",
            "Ed25519",
            "EdDSA",
            "sig",
        )
        assert jwk["kid"] == thumbprint(jwk)
    assert jwt.PyJWKSet.from_dict(jwks).keys  # other services can read it


def test_jwks_cannot_change_the_ring(rotated):
    _, ring = rotated
    ring.jwks()["keys"][0]["x"] = "tampered"
    assert ring.jwks()["keys"][0]["x"] == ring.current.public_jwk["x"] != "tampered"


def test_generated_ring_warns_that_tokens_die_with_the_process(caplog):
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        ring = eddsa_ring(None, [], LOG, allow_generated=True)
    assert [record.getMessage() for record in caplog.records] == [
        "ACCESS_TOKEN_PRIVATE_KEY_FILE not set: using a key pair made for this process, "
        "so access tokens die with it."
    ]
    assert ring.current.private is not None


def test_no_key_file_when_none_may_be_generated_stops_the_start():
    with pytest.raises(ConfigError, match="ACCESS_TOKEN_PRIVATE_KEY_FILE is not set"):
        eddsa_ring(None, [], LOG, allow_generated=False)


def ec_key():
    return ec.generate_private_key(ec.SECP256R1())


ED25519 = Ed25519PrivateKey.generate()
BAD_PRIVATE_FILES = [
    ("missing", None, "cannot be read (No such file or directory)"),
    ("public key", public_pem(ED25519), "holds a public key"),
    ("garbage", b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n", "not an"),
    ("encrypted", private_pem(ED25519, BestAvailableEncryption(b"pw")), "not an unencrypted"),
    ("EC key", private_pem(ec_key()), "not an Ed25519 key"),
]
BAD_PUBLIC_FILES = [
    ("missing", None, "cannot be read (No such file or directory)"),
    ("private key", private_pem(ED25519), "holds a private key"),
    ("garbage", b"not a key", "not a PEM public key"),
    ("EC key", public_pem(ec_key()), "not an Ed25519 key"),
]


@pytest.mark.parametrize(("case", "content", "message"), BAD_PRIVATE_FILES)
def test_bad_private_key_file_names_the_setting_and_shows_no_key(tmp_path, case, content, message):
    path = write(tmp_path, "key.pem", content) if content else str(tmp_path / "absent.pem")
    with pytest.raises(ConfigError) as raised:
        eddsa_ring(path, [], LOG, allow_generated=True)
    text = raised.value.message
    assert text.startswith(f"ACCESS_TOKEN_PRIVATE_KEY_FILE: {path} ")
    assert message in text
    assert shows_no_key(text, content)


@pytest.mark.parametrize(("case", "content", "message"), BAD_PUBLIC_FILES)
def test_bad_previous_key_file_names_the_setting_and_shows_no_key(tmp_path, case, content, message):
    path = write(tmp_path, "old.pub", content) if content else str(tmp_path / "absent.pub")
    with pytest.raises(ConfigError) as raised:
        eddsa_ring(None, [path], LOG, allow_generated=True)
    text = raised.value.message
    assert text.startswith(f"ACCESS_TOKEN_PREVIOUS_PUBLIC_KEY_FILES: {path} ")
    assert message in text
    assert shows_no_key(text, content)


def test_generate_writes_an_owner_only_key_pair_that_loads(tmp_path):
    path = str(tmp_path / "access.pem")
    result = CliRunner().invoke(cli, ["generate", path])
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(Path(path).stat().st_mode) == 0o600
    ring = eddsa_ring(path, [f"{path}.pub"], LOG, allow_generated=False)
    assert [key.kid for key in ring.keys] == [ring.current.kid]
    assert result.output.endswith(f"{path}.pub; kid {ring.current.kid}.\n")


def test_generate_never_overwrites_a_key(tmp_path):
    path = tmp_path / "access.pem"
    path.write_bytes(b"the key in use")
    result = CliRunner().invoke(cli, ["generate", str(path)])
    assert result.exit_code == 1
    assert f"{path}: refusing to overwrite a key file." in result.output
    assert path.read_bytes() == b"the key in use"
    assert not Path(f"{path}.pub").exists()


def test_key_files_may_start_with_a_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    key = rfc8037_key()
    write(tmp_path, "key.pem", private_pem(key))
    write(tmp_path, "key.pem.pub", public_pem(key))
    ring = eddsa_ring("~/key.pem", ["~/key.pem.pub"], LOG, allow_generated=False)
    assert ring.current.kid == RFC8037_THUMBPRINT


def test_hs256_checks_each_key_once_and_still_refuses_a_public_key_posing_as_a_secret():
    algorithm = _jws_global_obj.get_algorithm_by_name("HS256")
    assert isinstance(algorithm, CheckedOnceHMAC)
    secret = "a-secret-used-for-this-test-only-0123456789"
    claims = {"sub": "7"}
    checks = (CheckedOnceHMAC.prepare_key, CheckedOnceHMAC.check_key_length)
    before = [check.cache_info() for check in checks]
    for _ in range(5):
        token = jwt.encode(claims, secret, "HS256")
        assert jwt.decode(token, secret, algorithms=["HS256"]) == claims
    for check, earlier in zip(checks, before, strict=True):
        after = check.cache_info()
        assert after.misses - earlier.misses == 1 and after.hits - earlier.hits == 9
    # A secret shorter than SHA-256's 32 bytes is still warned of (RFC 7518 §3.2), every time.
    for _ in range(2):
        with pytest.warns(jwt.warnings.InsecureKeyLengthWarning):
            jwt.encode(claims, "short", "HS256")
    # RFC 8725 §2.1: a public key used as an HMAC secret is refused on every call, never cached.
    public_pem = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    for _ in range(3):
        with pytest.raises(jwt.InvalidKeyError):
            jwt.encode(claims, public_pem, "HS256")
