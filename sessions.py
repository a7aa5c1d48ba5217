"""Sessions a user can see and end: ``GET /sessions``, ``DELETE /sessions/<id>``, and what a
logout's ``scope`` ends ("local": this session, "others": the rest, "global": all).

Skip this file on a first read: ``POST /logout`` in server.py calls ``end_sessions``.
"""

import time
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify

from auth import token_required
from errors import APIError
from store import Session, get_policy, get_store
from web import audit

LOGOUT_SCOPES = ("local", "others", "global")

bp = Blueprint("sessions", __name__)


@bp.get("/sessions")
@token_required
def list_sessions() -> Response:
    """List the caller's live sessions, most recently used first: where am I logged in?"""
    sessions = get_store().sessions(g.claims["sub"], int(time.time()))
    return jsonify(sessions=[describe(session, g.claims["sid"]) for session in sessions])


@bp.delete("/sessions/<sid>")
@token_required
def end_session(sid: str) -> Response:
    """End one of the caller's sessions, and with it all its tokens."""
    user_id = g.claims["sub"]
    if not get_store().end(sid, user_id, int(time.time())):
        # OWASP Authorization Cheat Sheet: one answer for unknown, ended and other users' ids,
        # so nobody learns which ids exist.
        raise APIError(404, "session_not_found", "You have no live session with that id.")
    audit("session_ended", user=user_id, session=sid[:8], reason="ended_by_user")
    return current_app.response_class(status=204)


def logout_scope(body: dict[str, Any]) -> str:
    """Return the body's logout scope: "local" unless it names another."""
    scope = body.get("scope", "local")
    if scope not in LOGOUT_SCOPES:
        message = "The field 'scope' must be 'local', 'others' or 'global'."
        raise APIError(400, "invalid_field", message)
    return scope


def end_sessions(claims: dict[str, Any], scope: str) -> str:
    """End the sessions a logout of this scope names, starting from the token's session;
    return the scope that was applied."""
    store, now = get_store(), int(time.time())
    user_id, sid = claims["sub"], claims["sid"]
    session = store.get(sid, user_id, now)
    current = session is not None and get_policy().accepts(session, claims["jti"], now)
    if scope != "local" and current:
        ended = store.end_all(user_id, keep=sid if scope == "others" else None)
    else:
        # A token spent before the grace window may be a thief's: it ends its own session,
        # never the others.
        scope = "local"
        ended = [sid] if store.end(sid, user_id, now) else []
    audit("logout", user=user_id, session=sid[:8], scope=scope)
    for other in ended:
        audit("session_ended", user=user_id, session=other[:8], reason=f"logout_{scope}")
    return scope


def describe(session: Session, current_sid: str) -> dict[str, Any]:
    """Return what GET /sessions shows of a session; times in RFC 3339 UTC."""
    return {
        "id": session.id,
        "current": session.id == current_sid,
        "createdAt": rfc3339(session.created_at),
        "lastUsedAt": rfc3339(session.last_used_at),
        "expiresAt": rfc3339(session.expires_at),
        "idleExpiresAt": rfc3339(session.idle_expires_at) if session.idle_expires_at else None,
        "userAgent": session.user_agent,
        "ip": session.ip,
    }


def rfc3339(timestamp: int) -> str:
    """Return a Unix time as RFC 3339 UTC, e.g. 2026-11-27T10:00:00Z."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
