"""Bearer-token authentication of ``ddim-serve``'s front: with a token set, every request but ``GET /healthz``
(a load balancer's probe) must send ``Authorization: Bearer TOKEN``, or gets a JSON 401 with
``WWW-Authenticate: Bearer`` and the connection closed (its body is never read).

The token comes from ``--api-token``, ``--api-token-file`` or the environment variable ``DDIM_SERVE_TOKEN`` (an
option wins; the variable or a file keep it out of ``ps``). It is compared in constant time
(``hmac.compare_digest`` on bytes) and never written anywhere: messages name where it came from, never its value.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import Any, Mapping

from starlette.responses import JSONResponse

ENV_VAR = "DDIM_SERVE_TOKEN"
MIN_TOKEN_CHARS = 16  # a guessable token is no protection: refuse it at start, as a password rule would
MAX_TOKEN_BYTES = 4096  # a token file is one line: more is not a token file
GENERATE = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
OPEN_ROUTES = frozenset({("GET", "/healthz")})  # the health probe needs no token


def check_token(token: str, source: str) -> None:
    """ValueError (one line naming ``source``, never the token) unless the token is at least
    :data:`MIN_TOKEN_CHARS` printable ASCII characters without spaces (what an Authorization header carries)."""
    if len(token) < MIN_TOKEN_CHARS:
        what = "is empty" if not token else f"has {len(token)} characters"
        raise ValueError(f"{source}: the API token {what}, it needs at least {MIN_TOKEN_CHARS} (make one with "
                         f"{GENERATE})")
    if not all("!" <= c <= "~" for c in token):
        raise ValueError(f"{source}: the API token must be printable ASCII without spaces (what an Authorization "
                         f"header can carry; make one with {GENERATE})")


def read_token_file(path: Path) -> str:
    """The token in ``path``: the file's text less one trailing newline; ValueError in one line when it cannot be
    read, is not a small regular file, or is empty."""
    from runtime.common.files import read_regular

    try:
        data = read_regular(path, MAX_TOKEN_BYTES)
    except OSError as exc:
        raise ValueError(f"--api-token-file {path}: cannot read it ({exc.strerror or exc})") from None
    except ValueError:
        raise ValueError(f"--api-token-file {path}: not a regular file (give a file, or the token in "
                         f"{ENV_VAR})") from None
    if len(data) > MAX_TOKEN_BYTES:
        raise ValueError(f"--api-token-file {path}: over {MAX_TOKEN_BYTES} bytes: not a token file")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"--api-token-file {path}: the API token must be printable ASCII without spaces") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise ValueError(f"--api-token-file {path}: the file is empty")
    check_token(text, f"--api-token-file {path}")
    return text


def resolve_token(option: str | None, file: Path | None, environ: Mapping[str, str] = os.environ
                  ) -> tuple[str | None, str]:
    """(token or None, where it came from): ``--api-token``, else ``--api-token-file``, else :data:`ENV_VAR`
    (set but empty is refused, not taken as "no token": a failed ``$(cat ...)`` must not open the service)."""
    if option is not None and file is not None:
        raise ValueError("give --api-token or --api-token-file, not both")
    if option is not None:
        check_token(option, "--api-token")
        return option, "--api-token"
    if file is not None:
        return read_token_file(file), f"--api-token-file {file}"
    if ENV_VAR in environ:
        check_token(environ[ENV_VAR], ENV_VAR)
        return environ[ENV_VAR], ENV_VAR
    return None, ""


class BearerAuth:
    """ASGI middleware: requests without the token get a JSON 401 (``WWW-Authenticate: Bearer``; with
    ``error="invalid_token"`` when a wrong token was sent, RFC 6750), except :data:`OPEN_ROUTES`."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.token = token.encode("ascii")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and (scope.get("method"), scope.get("path")) not in OPEN_ROUTES:
            why = self.refusal(scope.get("headers") or [])
            if why is not None:
                message, challenge = why
                refusal = JSONResponse({"error": message}, status_code=401,
                                       headers={"WWW-Authenticate": challenge, "connection": "close"})
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, headers: list[tuple[bytes, bytes]]) -> tuple[str, str] | None:
        """None when the request carries the token, else (message, WWW-Authenticate value)."""
        given = [value for name, value in headers if name.lower() == b"authorization"]
        if len(given) != 1:
            return ("authentication required: send the header 'Authorization: Bearer TOKEN'" if not given else
                    "send one Authorization header, not several"), "Bearer"
        scheme, _, credentials = given[0].strip().partition(b" ")
        if scheme.lower() != b"bearer":  # the scheme is case-insensitive (RFC 7235)
            return "authentication required: send the header 'Authorization: Bearer TOKEN'", "Bearer"
        if not hmac.compare_digest(credentials.strip(b" "), self.token):
            return "invalid bearer token", 'Bearer error="invalid_token"'
        return None
