"""scripts/walkthrough.sh runs to its end, against the demo account or an account of USERS_FILE,
and never prints a real account's password."""

import shutil

import pytest

import users

from .conftest import PRODUCTION, ROOT, run_to_end, user_env

SCRIPT = str(ROOT / "scripts" / "walkthrough.sh")
PASSWORD = "alice's long passphrase"

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="the tour needs curl")


def test_the_tour_runs_with_the_demo_account(live_server, tmp_path):
    status, output = run_to_end(["bash", SCRIPT, live_server], user_env(), tmp_path, timeout=120)
    assert status == 0, output
    assert "demo-password" in output  # the demo's password is shown on purpose
    assert "password_not_changeable" in output  # step 10: the demo account keeps its password


def test_the_tour_runs_with_an_account_of_the_users_file_and_hides_its_password(
    start_server, tmp_path
):
    path = tmp_path / "users.txt"
    path.write_text(f"alice@example.com:{users.hash_password(PASSWORD)}\n")
    url = start_server(**PRODUCTION, USERS_FILE=str(path))  # production: no demo account
    env = user_env(TOUR_EMAIL="alice@example.com", TOUR_PASSWORD=PASSWORD)
    status, output = run_to_end(["bash", SCRIPT, url], env, tmp_path, timeout=120)
    assert status == 0, output
    assert PASSWORD not in output and "passphrase" not in output
    assert '-d "$CREDENTIALS_JSON"' in output
    assert "weak_password" in output  # step 10: a new password too short, refused
    assert "Every answer was the one the service promises." in output
