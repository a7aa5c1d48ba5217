"""The browser transport's CSRF tokens, below the routes (test_server drives them over HTTP)."""

import pytest

from browser import check_csrf_session, csrf_token
from errors import APIError
from server import create_app

from .conftest import TEST_CONFIG

OLD_REFRESH = "an-old-refresh-secret-0123456789abcdef"


def csrf_of(app, sid):
    with app.app_context():
        return csrf_token(sid)


def fits(app, sid, sent):
    with app.test_request_context(headers={"X-CSRF-Token": sent}):
        try:
            check_csrf_session(sid)
        except APIError as error:
            assert (error.code, error.error) == (403, "csrf_failed")
            return False
        return True


def test_csrf_tokens_match_under_current_and_previous_refresh_secrets():
    old = create_app(TEST_CONFIG | {"REFRESH_TOKEN_SECRET": OLD_REFRESH})
    rotated = create_app(TEST_CONFIG | {"REFRESH_TOKEN_PREVIOUS_SECRETS": OLD_REFRESH})
    assert fits(rotated, "sid-1", csrf_of(old, "sid-1"))
    assert fits(rotated, "sid-1", csrf_of(rotated, "sid-1"))
    assert not fits(rotated, "sid-2", csrf_of(rotated, "sid-1"))
    assert not fits(rotated, "sid-1", "é" * 43)  # any text, never a crash
    assert not fits(old, "sid-1", csrf_of(rotated, "sid-1"))  # a key we do not hold


@pytest.mark.parametrize("sid", ["a", "sid-1", "x" * 200])
def test_a_csrf_token_is_bound_to_its_session(sid):
    app = create_app(TEST_CONFIG)
    assert csrf_of(app, sid) == csrf_of(app, sid)
    assert csrf_of(app, sid) != csrf_of(app, sid + "!")
