"""A user changes their own password: ``POST /password``; every other session then ends.

Skip this file on a first read. OWASP Session Management Cheat Sheet and ASVS 5.0 V7: a
password change ends the account's other sessions, since one of them may be the reason for the
change; the session that made it goes on.
"""

from flask import Blueprint, Response, current_app, g

from auth import token_required
from errors import APIError
from settings import ConfigError
from store import get_store
from throttle import Throttled, get_login_guard
from users import (
    MAX_PASSWORD_LENGTH,
    PasswordChangedMeanwhile,
    PasswordNotChangeable,
    get_users,
    password_problem,
)
from web import audit, client_address, json_body, text_field

bp = Blueprint("accounts", __name__)


@bp.post("/password")
@token_required
def change_password() -> Response:
    """Check the current password as a login does, set the new one, end the other sessions."""
    body = json_body()
    current = text_field(body, "currentPassword", MAX_PASSWORD_LENGTH)
    new = text_field(body, "newPassword", MAX_PASSWORD_LENGTH)
    user, users = g.user, get_users()
    if not users.in_file(user):
        raise not_changeable()
    problem = password_problem(new, user.email)  # before any hashing, and before a guess counts
    if problem:
        raise APIError(400, "weak_password", f"The new password cannot be used: {problem}.")
    # A stolen access token must not become a way around the login limits: a wrong current
    # password counts as a failed login (NIST SP 800-63B §5.2.2).
    guard, address = get_login_guard(), client_address()
    try:
        guard.count_attempt(user.email, address)
    except Throttled as error:
        audit("login_throttled", limit=error.limit)
        raise
    checked = users.authenticate(user.email, current)  # with the hash it was checked on
    if checked is None:
        audit("login_failed", user=user.id, via="password_change")
        raise APIError(401, "invalid_credentials", "The current password is incorrect.")
    guard.succeeded(user.email, address)

    def end_others() -> list[str]:
        # Before the file is written: if the store fails, the password stays as it was.
        return get_store().end_all(user.id, keep=g.claims["sid"])

    try:
        ended = users.change_password(checked, current, new, before_writing=end_others)
    except PasswordNotChangeable:  # its line was removed meanwhile
        raise not_changeable() from None
    except PasswordChangedMeanwhile:
        message = "The password was changed meanwhile; nothing was changed by this request."
        raise APIError(409, "password_changed_meanwhile", message) from None
    except (OSError, ConfigError) as error:  # not writable, or not a file the servers can read
        reason = error.message if isinstance(error, ConfigError) else error.strerror
        current_app.logger.error("USERS_FILE cannot be changed: %s", reason)
        message = "The accounts file cannot be written right now; the password is unchanged."
        raise APIError(503, "accounts_unavailable", message, {"Retry-After": "60"}) from None
    # Again once the file is written: a login that another worker started in between, and that
    # looked at the file just before (Users.still_holds), ends too.
    ended += [sid for sid in end_others() if sid not in ended]
    audit("password_changed", user=user.id, session=g.claims["sid"][:8], ended=str(len(ended)))
    for sid in ended:
        audit("session_ended", user=user.id, session=sid[:8], reason="password_changed")
    return current_app.response_class(status=204)


def not_changeable() -> APIError:
    """Return the 403 of an account whose password is not this service's to write."""
    return APIError(
        403,
        "password_not_changeable",
        "This account's password is set by the server's settings (the demo account's is "
        "DEMO_USER_PASSWORD); only an account of USERS_FILE changes its password here.",
    )
