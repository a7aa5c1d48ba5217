"""A lockout says how long in minutes, as a person would, not in seconds."""

import pytest

from server import create_app
from throttle import in_words

from .conftest import TEST_CONFIG


@pytest.mark.parametrize(
    ("seconds", "words"),
    [(1, "1 second"), (59, "59 seconds"), (60, "1 minute"), (61, "2 minutes"), (900, "15 minutes")],
)
def test_a_wait_in_words(seconds, words):
    assert in_words(seconds) == words


def test_ten_wrong_passwords_lock_the_pair_for_15_minutes_and_say_so():
    client = create_app(TEST_CONFIG).test_client()
    wrong = {"email": "demo@example.com", "password": "not the password"}
    for _ in range(10):  # LOGIN_RATE_LIMIT: 10 per 15 minutes
        assert client.post("/login", json=wrong).status_code == 401
    response = client.post("/login", json=wrong)
    assert response.status_code == 429
    assert response.json["message"] == "Too many failed logins; retry in 15 minutes."
    assert 840 < int(response.headers["Retry-After"]) <= 900  # the header stays in seconds
