"""Who may use the console: one operator token, a signed session cookie, CSRF-safe forms.

Sign-in trades `KYRIE_CONSOLE_TOKEN` (compared in constant time, both sides
hashed first) for a session cookie; the token itself is never sent back, put
in a page or a URL, and the log formatter masks it (Settings.secrets).

The session is stateless: `<payload>.<mac>`, the payload naming a random
session id, who signed in (a name the operator gives, for the action log)
and when it expires, the mac an HMAC under a key derived from the token.
So every process serving the console accepts the same sessions, and changing
the token signs everyone out.  The cookie is HttpOnly (no script reads it),
SameSite=Strict (no other site's page sends it) and Secure when the request
came over https (directly, or per X-Forwarded-Proto from the proxy).

State-changing requests are checked twice: the form carries the session's
CSRF token (an HMAC of the session id, checked in constant time), and the
request's Origin (or, when a browser leaves it out, Referer) must be this
console's own origin.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.requests import Request

COOKIE = "kyrie_console"
SESSION_SECONDS = 12 * 3600
WHO_MAX = 60


@dataclass(frozen=True)
class Session:
    sid: str
    who: str
    expires: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Keys:
    """What the console derives from its token; the token itself is not kept."""

    def __init__(self, token: str) -> None:
        self._token_digest = hashlib.sha256(token.encode("utf-8")).digest()
        self._mac_key = hashlib.sha256(b"kyrie-console-session\x00" + token.encode("utf-8")).digest()

    def token_matches(self, given: str) -> bool:
        digest = hashlib.sha256(given.encode("utf-8", "surrogatepass")).digest()
        return hmac.compare_digest(digest, self._token_digest)

    def _mac(self, purpose: bytes, data: bytes) -> bytes:
        return hmac.new(self._mac_key, purpose + b"\x00" + data, hashlib.sha256).digest()

    def new_session(self, who: str) -> tuple[Session, str]:
        session = Session(secrets.token_urlsafe(18), who, int(time.time()) + SESSION_SECONDS)
        payload = _b64(json.dumps({"sid": session.sid, "who": session.who, "exp": session.expires}).encode())
        return session, f"{payload}.{_b64(self._mac(b'session', payload.encode()))}"

    def session_of(self, cookie: str | None) -> Session | None:
        if not cookie or cookie.count(".") != 1 or len(cookie) > 1024:
            return None
        payload, mac = cookie.split(".")
        try:
            given = _unb64(mac)
        except ValueError:
            return None
        if not hmac.compare_digest(given, self._mac(b"session", payload.encode())):
            return None
        try:
            data = json.loads(_unb64(payload))
            session = Session(str(data["sid"]), str(data["who"]), int(data["exp"]))
        except (ValueError, KeyError, TypeError):
            return None
        return session if session.expires > time.time() else None

    def csrf_token(self, session: Session) -> str:
        return _b64(self._mac(b"csrf", session.sid.encode()))

    def csrf_matches(self, session: Session, given: str | None) -> bool:
        expected = self.csrf_token(session).encode()
        return hmac.compare_digest(hashlib.sha256(expected).digest(),
                                   hashlib.sha256((given or "").encode("utf-8", "surrogatepass")).digest())


def is_https(request: Request) -> bool:
    forwarded = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return forwarded == "https" or request.url.scheme == "https"


def own_origin(request: Request) -> str:
    scheme = "https" if is_https(request) else "http"
    return f"{scheme}://{request.headers.get('host', '')}".lower()


def same_origin(request: Request) -> bool:
    """The request was sent by a page of this console (what every browser says in Origin)."""
    origin = request.headers.get("origin")
    if origin is None:
        referer = request.headers.get("referer")
        if referer is None:
            return False
        parts = urlsplit(referer)
        origin = f"{parts.scheme}://{parts.netloc}"
    return origin.lower() == own_origin(request)


def clean_who(text: str) -> str:
    """The operator's name as given at sign-in, kept printable and short (it goes in log lines)."""
    kept = "".join(ch for ch in text if ch.isprintable()).strip()[:WHO_MAX]
    return kept or "operator"
