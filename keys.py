"""Keys: the keys that sign and verify each kind of token, their ids, and the public set (JWKS).

Every token names its key in its ``kid`` header, so several keys can verify at once: the current
one, which signs, and the previous ones, which only verify until the tokens they signed expire.
That is what lets a key change without logging anyone out (docs/keys.md has the runbook).

Run ``python keys.py generate PATH`` to make an Ed25519 key pair for EdDSA access tokens.
"""

import base64
import errno
import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)
from jwt.algorithms import HMACAlgorithm

from settings import ConfigError, app_command

# RFC 7515 §4.1.4: a kid is only a hint, so an HMAC secret's kid is a one-way hash of it, never
# the secret; the label keeps this hash apart from any other use of the secret.
HMAC_KID_LABEL = b"jwt-refresh-service hmac kid\x00"
HMAC_KID_LENGTH = 16  # base64url characters: 96 bits, plenty to tell a few secrets apart
PRIVATE_KEY_SETTING = "ACCESS_TOKEN_PRIVATE_KEY_FILE"
PUBLIC_KEYS_SETTING = "ACCESS_TOKEN_PREVIOUS_PUBLIC_KEY_FILES"


class CheckedOnceHMAC(HMACAlgorithm):
    """PyJWT's HS256, its checks of a key run once per key instead of on every token.

    PyJWT checks an HMAC key each time it signs or verifies: that it is not empty, not a
    public key or certificate posing as a secret (the algorithm-confusion attack of RFC 8725
    §2.1), and long enough (RFC 7518 §3.2). Our keys come from the settings and never change
    while the process runs, so the answers for each are remembered; a key that fails raises
    every time, as before, and a short one is warned of every time.
    """

    @functools.lru_cache(maxsize=64)  # noqa: B019 - registered once, it lives as long as we do
    def prepare_key(self, key: str | bytes) -> bytes:
        return super().prepare_key(key)

    @functools.lru_cache(maxsize=64)  # noqa: B019 - as prepare_key
    def check_key_length(self, key: bytes) -> str | None:
        return super().check_key_length(key)


jwt.unregister_algorithm("HS256")
jwt.register_algorithm("HS256", CheckedOnceHMAC(HMACAlgorithm.SHA256))


@dataclass(frozen=True)
class Key:
    """One key and its id; a previous key has nothing to sign with and only verifies."""

    kid: str
    private: Any | None  # what jwt.encode takes: the secret, or an Ed25519PrivateKey
    public: Any  # what jwt.decode takes: the secret, or an Ed25519PublicKey
    public_jwk: dict[str, str] | None  # RFC 7517: what other services may see; None for HMAC


class KeyRing:
    """The keys of one kind of token: the one that signs, and every one that still verifies."""

    def __init__(self, algorithm: str, current: Key, previous: list[Key]) -> None:
        # RFC 8725 §3.1: the algorithm is ours, pinned here, never read from a token's header.
        self.algorithm = algorithm
        self.current = current  # the key that signs
        # Built once, so finding a token's key costs one dict lookup. The current key comes
        # first and wins if a previous key is the same one.
        by_kid: dict[str, Key] = {}
        for key in [current, *previous]:
            by_kid.setdefault(key.kid, key)
        self._by_kid = by_kid
        self.keys = tuple(by_kid.values())  # every key that verifies, the current one first

    def find(self, kid: object) -> Key | None:
        """Return the current or previous key named ``kid``, or None for any other value."""
        # RFC 8725 §3.10: a kid is attacker input; it is only ever looked up, and only ours match.
        return self._by_kid.get(kid) if isinstance(kid, str) else None

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """Return the RFC 7517 JWK Set of the public keys that verify; empty for HMAC."""
        return {"keys": [dict(key.public_jwk) for key in self.keys if key.public_jwk]}


def hmac_ring(secret: str, previous: list[str]) -> KeyRing:
    """Return the HS256 ring: ``secret`` signs, and it and the ``previous`` secrets verify."""
    current = Key(hmac_kid(secret), secret, secret, None)
    return KeyRing("HS256", current, [Key(hmac_kid(old), None, old, None) for old in previous])


def hmac_kid(secret: str) -> str:
    """Return the kid of an HMAC secret: a short hash that names it without revealing it."""
    return _base64url(hashlib.sha256(HMAC_KID_LABEL + secret.encode()).digest())[:HMAC_KID_LENGTH]


def eddsa_ring(
    private_key_file: str | None,
    previous_public_key_files: list[str],
    log: logging.Logger,
    allow_generated: bool,
) -> KeyRing:
    """Return the EdDSA ring: the private key signs; its public key and the previous ones verify."""
    previous = [_ed25519_key(_load_public_key(path), None) for path in previous_public_key_files]
    if private_key_file:
        private_key = _load_private_key(private_key_file)
    elif allow_generated:
        private_key = Ed25519PrivateKey.generate()
        if not app_command():  # a `flask users` command issues no tokens: nothing dies
            log.warning(
                "%s not set: using a key pair made for this process, so access tokens die with it.",
                PRIVATE_KEY_SETTING,
            )
    else:
        raise ConfigError(
            f"{PRIVATE_KEY_SETTING} is not set; production needs an Ed25519 private key "
            "(make one with: python keys.py generate PATH)."
        )
    return KeyRing("EdDSA", _ed25519_key(private_key.public_key(), private_key), previous)


def thumbprint(jwk: dict[str, str]) -> str:
    """Return the RFC 7638 thumbprint of an Ed25519 JWK, which serves as its kid."""
    # RFC 7638 §3.2 and RFC 8037 §2: the required members crv, kty and x, sorted, no spaces.
    required = {name: jwk[name] for name in ("crv", "kty", "x")}
    canonical = json.dumps(required, sort_keys=True, separators=(",", ":"))
    return _base64url(hashlib.sha256(canonical.encode()).digest())


def generate(path: str) -> str:
    """Write a new Ed25519 key pair to ``path`` (private) and ``path.pub``; return its kid."""
    public_path = f"{path}.pub"
    for name in (path, public_path):
        if Path(name).exists():
            raise FileExistsError(errno.EEXIST, "refusing to overwrite a key file", name)
    private_key = Ed25519PrivateKey.generate()
    # OWASP Cryptographic Storage Cheat Sheet, key storage: only the owner may read a private
    # key; "x" creates the file or fails, so a key is never overwritten.
    with open(path, "xb", opener=lambda name, flags: os.open(name, flags, 0o600)) as file:
        file.write(private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    public_key = private_key.public_key()
    with open(public_path, "xb") as file:
        file.write(public_key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    return _ed25519_key(public_key, None).kid


def _ed25519_key(public_key: Ed25519PublicKey, private_key: Ed25519PrivateKey | None) -> Key:
    x = _base64url(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw))
    jwk = {"kty": "OKP", "crv": "Ed25519", "x": x}
    kid = thumbprint(jwk)
    return Key(kid, private_key, public_key, jwk | {"kid": kid, "alg": "EdDSA", "use": "sig"})


def _load_private_key(path: str) -> Ed25519PrivateKey:
    pem = _read(path, PRIVATE_KEY_SETTING)
    if b"PUBLIC KEY-----" in pem:
        raise ConfigError(f"{PRIVATE_KEY_SETTING}: {path} holds a public key, not the private one.")
    try:
        key = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):  # TypeError: it needs a password
        raise ConfigError(
            f"{PRIVATE_KEY_SETTING}: {path} is not an unencrypted PEM private key."
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{PRIVATE_KEY_SETTING}: {path} is not an Ed25519 key.")
    return key


def _load_public_key(path: str) -> Ed25519PublicKey:
    pem = _read(path, PUBLIC_KEYS_SETTING)
    if b"PRIVATE KEY-----" in pem:
        # A private key belongs in one place only: a previous key only ever verifies.
        raise ConfigError(f"{PUBLIC_KEYS_SETTING}: {path} holds a private key; give its .pub.")
    try:
        key = load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{PUBLIC_KEYS_SETTING}: {path} is not a PEM public key.") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{PUBLIC_KEYS_SETTING}: {path} is not an Ed25519 key.")
    return key


def _read(path: str, setting: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()  # ~ too, as .env files do not expand it
    except OSError as error:
        raise ConfigError(f"{setting}: {path} cannot be read ({error.strerror}).") from None


def _base64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@click.group()
def cli() -> None:
    """Manage the Ed25519 key pairs that sign access tokens with EdDSA."""


@cli.command("generate")
@click.argument("path")
def generate_command(path: str) -> None:
    """Write a new private key to PATH (mode 0600) and its public key to PATH.pub."""
    try:
        kid = generate(path)
    except OSError as error:
        raise click.ClickException(f"{error.filename}: {error.strerror}.") from None
    click.echo(f"Wrote {path} (private, keep it secret) and {path}.pub; kid {kid}.")


if __name__ == "__main__":
    cli()
