import time
import tracemalloc

import jwt
import pytest

import auth
from auth import ACCESS, REFRESH, InvalidToken, get_tokens
from keys import hmac_ring
from store import Policy
from token_cache import MAX_ENTRIES, CachingTokens, VerifiedTokens

from .conftest import ACCESS_SECRET, REFRESH_SECRET, released_together


def caching_tokens(access=ACCESS_SECRET, previous=(), verified=None, access_ttl=900, leeway=5):
    return CachingTokens(
        hmac_ring(access, list(previous)),
        hmac_ring(REFRESH_SECRET, []),
        access_ttl,
        "issuer",
        "audience",
        leeway,
        verified=VerifiedTokens() if verified is None else verified,
    )


def access_token(tokens, now=None, user="7"):
    """Mint an access token at ``now`` (default: the real clock, which PyJWT checks exp by)."""
    now = int(time.time()) if now is None else now
    session = Policy().new_session(user, now, "curl/8", "127.0.0.1")
    return tokens.issue_access(session, now)[0]


@pytest.fixture
def signature_checks(monkeypatch):
    """Count PyJWT's signature checks, each still done by PyJWT itself."""
    calls = []
    decode = jwt.decode

    def counted(*args, **kwargs):
        calls.append(args[0])
        return decode(*args, **kwargs)

    monkeypatch.setattr(auth.jwt, "decode", counted)
    return calls


def test_a_verified_access_token_skips_only_its_signature_check(signature_checks):
    tokens = caching_tokens()
    token = access_token(tokens)
    first = tokens.decode(token, ACCESS)
    second = tokens.decode(token, ACCESS)
    assert first == second and first["sub"] == "7"
    assert signature_checks == [token]
    second["sub"] = "someone else"  # each caller gets its own copy
    assert tokens.decode(token, ACCESS)["sub"] == "7"


def test_refresh_tokens_are_never_cached(signature_checks):
    tokens = caching_tokens()
    session = Policy().new_session("7", int(time.time()), "curl/8", "127.0.0.1")
    refresh = tokens.issue_refresh(session)
    tokens.decode(refresh, REFRESH)
    tokens.decode(refresh, REFRESH)
    assert len(signature_checks) == 2 and len(tokens.verified) == 0


@pytest.mark.parametrize(
    "spoil",
    [
        lambda token: token[:-2] + ("AA" if token[-2:] != "AA" else "BB"),  # signature
        lambda token: jwt.encode(  # signed with another secret, under our kid
            jwt.decode(token, options={"verify_signature": False}),
            "another-secret-0123456789abcdef-0123",
            headers=jwt.get_unverified_header(token),
        ),
    ],
    ids=["tampered", "foreign-secret"],
)
def test_a_token_that_fails_its_check_is_never_cached(spoil, signature_checks):
    tokens = caching_tokens()
    bad = spoil(access_token(tokens))
    signature_checks.clear()
    for _ in range(3):
        with pytest.raises(InvalidToken):
            tokens.decode(bad, ACCESS)
    assert len(signature_checks) == 3 and len(tokens.verified) == 0


def test_an_expired_token_is_never_cached_even_within_the_leeway(signature_checks):
    tokens = caching_tokens(access_ttl=2, leeway=120)
    now = int(time.time())
    within_leeway = access_token(tokens, now=now - 30)  # exp 28 s ago; the leeway is 120 s
    assert tokens.decode(within_leeway, ACCESS)["sub"] == "7"
    tokens.decode(within_leeway, ACCESS)
    assert len(signature_checks) == 2 and len(tokens.verified) == 0
    long_expired = access_token(tokens, now=now - 300)
    with pytest.raises(InvalidToken, match="expired"):
        tokens.decode(long_expired, ACCESS)
    assert len(tokens.verified) == 0


def test_an_entry_is_never_used_at_or_past_its_exp():
    ring = hmac_ring(ACCESS_SECRET, [])
    cache, key = VerifiedTokens(), ring.current
    cache.put("token", key, {"exp": 1000}, now=990)
    assert cache.get("token", ring, now=999.9) == {"exp": 1000}
    assert cache.get("token", ring, now=1000) is None
    assert len(cache) == 0  # and it is dropped
    cache.put("late", key, {"exp": 1000}, now=1000)
    assert len(cache) == 0


def test_expired_entries_leave_as_new_ones_come():
    cache, key = VerifiedTokens(), hmac_ring(ACCESS_SECRET, []).current
    for n in range(10):
        cache.put(f"old-{n}", key, {"exp": 1000}, now=900)
    cache.put("new", key, {"exp": 2000}, now=1500)
    assert len(cache) == 1


def test_a_key_removed_at_restart_refuses_a_token_the_cache_holds(signature_checks):
    old, new = "the-old-access-secret-0123456789abcdef", "the-new-access-secret-0123456789abcd"
    verified = VerifiedTokens()
    before = caching_tokens(access=old, verified=verified)
    token = access_token(before)
    before.decode(token, ACCESS)
    assert len(verified) == 1
    # The same cache, the previous key kept: still good. Then the previous key removed.
    assert caching_tokens(access=new, previous=[old], verified=verified).decode(token, ACCESS)
    after = caching_tokens(access=new, verified=verified)
    with pytest.raises(InvalidToken, match="key this service does not hold"):
        after.decode(token, ACCESS)


def test_another_key_under_the_same_kid_never_reads_the_cache(signature_checks):
    verified = VerifiedTokens()
    tokens = caching_tokens(verified=verified)
    token = access_token(tokens)
    tokens.decode(token, ACCESS)
    impostor_ring = hmac_ring("an-impostor-secret-0123456789abcdefg", [])
    same_kid = hmac_ring(ACCESS_SECRET, [])  # the same secret, so the same kid: another key
    assert same_kid.current.kid == tokens.access_keys.current.kid
    assert verified.get(token, impostor_ring, time.time()) is None
    assert verified.get(token, same_kid, time.time()) is None
    assert verified.get(token, tokens.access_keys, time.time()) is not None


def test_a_flood_of_distinct_valid_tokens_stays_within_the_bound():
    tokens = caching_tokens()
    flood = [access_token(tokens, user=str(n)) for n in range(2 * MAX_ENTRIES)]
    tracemalloc.start()
    try:
        for token in flood[:MAX_ENTRIES]:
            tokens.decode(token, ACCESS)
        full, _ = tracemalloc.get_traced_memory()
        for token in flood[MAX_ENTRIES:]:
            tokens.decode(token, ACCESS)
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(tokens.verified) == MAX_ENTRIES
    # As many again, each evicting one, cost nothing but the dict's own churn: under 5% of it.
    assert after - full < full / 20
    # The newest are kept, the oldest went first.
    ring = tokens.access_keys
    assert tokens.verified.get(flood[-1], ring, time.time()) is not None
    assert tokens.verified.get(flood[0], ring, time.time()) is None


def test_threads_released_together_keep_the_bound():
    verified = VerifiedTokens(max_entries=50)
    tokens = caching_tokens(verified=verified)
    flood = [access_token(tokens, user=str(n)) for n in range(400)]

    def decode_some(n):
        for token in flood[n::16] + flood[n::16]:
            assert tokens.decode(token, ACCESS)["sub"]
        return len(verified)

    assert max(released_together(16, decode_some)) <= 50


def test_the_app_caches_and_still_checks_the_session_on_every_request(client, auth_actions):
    assert isinstance(get_tokens_of(client), CachingTokens)
    login = auth_actions.login().get_json()
    access = login["accessToken"]
    assert auth_actions.me(access).status_code == 200
    assert auth_actions.me(access).status_code == 200  # served from the cache
    assert len(get_tokens_of(client).verified) == 1
    auth_actions.logout(login["refreshToken"])
    answer = auth_actions.me(access)
    assert answer.status_code == 401
    assert "session has ended" in answer.get_json()["message"].lower()


def get_tokens_of(client):
    with client.application.app_context():
        return get_tokens()


def test_a_cached_access_token_is_still_refused_where_a_refresh_token_is_due():
    tokens = caching_tokens()
    token = access_token(tokens)
    tokens.decode(token, ACCESS)
    with pytest.raises(InvalidToken, match="This is an access token; send a refresh token"):
        tokens.decode(token, REFRESH)


@pytest.mark.parametrize(
    "reshape",
    [
        lambda token: token + "." + "A" * 9000,  # over the length bound
        lambda token: token + ".",  # four segments
        lambda token: token + " ",
        lambda token: token.replace(".", "..", 1),
    ],
    ids=["too-long", "four-segments", "trailing-space", "empty-segment"],
)
def test_only_the_exact_token_of_the_right_length_and_shape_is_found(reshape):
    tokens = caching_tokens()
    token = access_token(tokens)
    tokens.decode(token, ACCESS)
    with pytest.raises(InvalidToken):
        tokens.decode(reshape(token), ACCESS)
    assert len(tokens.verified) == 1
