"""Channel changes through the running daemon: the admin endpoints (only with an admin token).

    POST /admin/snapshots/promote    {"version": V?, "reason": "..."?}   canary (or V) -> stable
    POST /admin/snapshots/demote     {"reason": "..."?}                  take the canary out
    POST /admin/snapshots/rollback   {"to": V?, "reason": "..."?}        stable -> previous stable (or V)
    POST /admin/snapshots/pin        {"version": V, "sandbox_id": ID?, "reason": "..."?}
                                     stable -> V, held there until unpinned (or: that sandbox -> V)
    POST /admin/snapshots/unpin      {"sandbox_id": ID?, "reason": "..."?}  release stable (or the sandbox)

`Authorization: Bearer <admin token>`: 401 without a bearer token, 403 with a wrong one; without an
admin token configured the routes do not exist (404). A version is a JSON integer or a canonical
ASCII decimal string. Answers: 200 {"action", "version", "sandbox_id", "channels"}; 400 a malformed
body; 409 a change the current channels do not allow (no canary, no previous stable, not pinned, and
promote or rollback while stable is pinned); 422 a version that does not exist or is corrupt. Every
change goes through SnapshotStore (the same flock as the daemon's publisher and the CLI) and is seen by
the next GET.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from streamdqn.errors import SnapshotConflictError, SnapshotError
from streamdqn.logs import log_event
from streamdqn.serve.auth import bearer_token, token_matches
from streamdqn.snapshots.channels import ChannelRecord
from streamdqn.snapshots.layout import is_version_number, parse_version, sandbox_id_problem
from streamdqn.snapshots.store import SnapshotStore

MAX_BODY_BYTES = 16 * 1024
MAX_REASON_CHARS = 500
_FIELDS: dict[str, frozenset[str]] = {
    "promote": frozenset({"version", "reason"}),
    "demote": frozenset({"reason"}),
    "rollback": frozenset({"to", "reason"}),
    "pin": frozenset({"sandbox_id", "version", "reason"}),
    "unpin": frozenset({"sandbox_id", "reason"}),
}
_REQUIRED: dict[str, frozenset[str]] = {"pin": frozenset({"version"})}
_PAST = {"promote": "promoted", "demote": "demoted", "rollback": "rolled back", "pin": "pinned",
         "unpin": "unpinned"}
ADMIN_ACTIONS = tuple(_FIELDS)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadAdminRequest(ValueError):
    """The body of an admin request is not what the action takes."""


@dataclass(frozen=True)
class AdminRequest:
    """One parsed admin request; `version` is promote's/pin's version or rollback's `to`; pin and unpin
    without a `sandbox_id` act on stable."""

    action: str
    version: int | None = None
    sandbox_id: str | None = None
    reason: str = ""


def version_field(name: str, value: object) -> int:
    """A version from JSON: an integer, or a canonical ASCII decimal string (never "١٢" or "012")."""
    if isinstance(value, str):
        parsed = parse_version(value)
        if parsed is not None:
            return parsed
    elif type(value) is int and is_version_number(value):
        return value
    raise BadAdminRequest(f"{name}: {value!r} is not a snapshot version "
                          "(1 to 12 ASCII digits, no sign, no leading zero)")


def parse_admin_request(action: str, body: bytes) -> AdminRequest:
    """The request for `action` from its JSON body (an empty body is {}); BadAdminRequest says why not."""
    try:
        raw = json.loads(body) if body.strip() else {}
    except ValueError:
        raise BadAdminRequest("the body is not valid JSON") from None
    if not isinstance(raw, dict):
        raise BadAdminRequest("the body must be a JSON object")
    unknown = sorted(set(raw) - _FIELDS[action])
    if unknown:
        raise BadAdminRequest(f"{action} takes {sorted(_FIELDS[action])}, not {unknown}")
    missing = sorted(_REQUIRED.get(action, frozenset()) - set(raw))
    if missing:
        raise BadAdminRequest(f"{action} needs {missing}")
    reason = raw.get("reason", "")
    if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS:
        raise BadAdminRequest(f"reason must be a string of at most {MAX_REASON_CHARS} characters")
    version_value = raw.get("to", raw.get("version"))
    version = None if version_value is None else version_field("to" if "to" in raw else "version",
                                                               version_value)
    sandbox_id = raw.get("sandbox_id")
    if sandbox_id is not None:
        if not isinstance(sandbox_id, str):
            raise BadAdminRequest("sandbox_id must be a string")
        problem = sandbox_id_problem(sandbox_id)
        if problem is not None:
            raise BadAdminRequest(f"sandbox_id: {problem}")
    return AdminRequest(action, version, sandbox_id, reason)


def apply_admin_request(root: Path, request: AdminRequest, actor: str) -> ChannelRecord:
    """Carry out `request` on the store under `root` (blocking: flock and fsync)."""
    store = SnapshotStore(root)
    a, who, why = request.action, actor, request.reason
    if a == "promote":
        return store.promote(request.version, actor=who, reason=why)
    if a == "demote":
        return store.demote(actor=who, reason=why)
    if a == "rollback":
        return store.rollback(request.version, actor=who, reason=why)
    if a == "pin":
        assert request.version is not None  # parse_admin_request requires it
        if request.sandbox_id is None:
            return store.pin_stable(request.version, actor=who, reason=why)
        return store.pin(request.sandbox_id, request.version, actor=who, reason=why)
    if request.sandbox_id is None:
        return store.unpin_stable(actor=who, reason=why)
    return store.unpin(request.sandbox_id, actor=who, reason=why)


def _require_admin(token: str, handler: Handler) -> Handler:
    """401 without a bearer token, 403 with one that is not the admin token."""
    expected = token.encode()

    async def guarded(request: web.Request) -> web.StreamResponse:
        given = bearer_token(request)
        if given is None:
            return web.json_response({"error": "missing admin bearer token"}, status=401,
                                     headers={"WWW-Authenticate": 'Bearer realm="streamdqn-admin"'})
        if not token_matches(given, expected):
            return web.json_response({"error": "this token may not change snapshot channels"}, status=403)
        return await handler(request)

    return guarded


def admin_routes(root: Path, admin_token: str) -> list[web.RouteDef]:
    """The admin routes for a store under `root`, guarded by `admin_token` (which must not be empty)."""
    if not admin_token:
        raise ValueError("the admin endpoints need an admin token")

    async def change(request: web.Request) -> web.StreamResponse:
        action = request.match_info["action"]
        if action not in _FIELDS:
            raise web.HTTPNotFound()
        body = await request.content.read(MAX_BODY_BYTES + 1)
        if len(body) > MAX_BODY_BYTES:
            return _error(f"the body is over {MAX_BODY_BYTES} bytes", 400)
        try:
            parsed = parse_admin_request(action, body)
            actor = f"http {request.remote or '?'}"
            record = await asyncio.to_thread(apply_admin_request, root, parsed, actor)
        except BadAdminRequest as exc:
            return _error(str(exc), 400)
        except SnapshotConflictError as exc:
            return _error(str(exc), 409)
        except SnapshotError as exc:  # not found, corrupt, unreadable pins
            return _error(str(exc), 422)
        log_event(f"channel {_PAST[action]}", actor=actor, version=parsed.version,
                  sandbox_id=parsed.sandbox_id, reason=parsed.reason, stable=record.stable,
                  canary=record.canary, stable_pin=record.stable_pin)
        return web.json_response(_answer(action, parsed, record))

    return [web.post("/admin/snapshots/{action}", _require_admin(admin_token, change))]


def _answer(action: str, request: AdminRequest, record: ChannelRecord) -> dict[str, Any]:
    return {"action": action, "version": request.version, "sandbox_id": request.sandbox_id,
            "channels": record.as_dict()}


def _error(message: str, status: int) -> web.Response:
    return web.json_response({"error": message}, status=status)
