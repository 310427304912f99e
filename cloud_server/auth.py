"""Who is calling, and how many of their requests may run at once.

Bearer tokens come from a file (``auth_tokens_file``): one token per line, either ``TOKEN`` or
``CLIENT_NAME:TOKEN``; blank lines and lines starting with ``#`` are ignored. The first ``:`` ends the name, so a
token that itself contains ``:`` is written with an empty name, ``:TOKEN``. A name is letters, digits and
``._-``; a token has no whitespace (the header could not carry it); a token listed twice is refused.

A call must carry the gRPC metadata ``authorization: Bearer TOKEN``; the client's identity is its name (or a
short digest of the token). Without a tokens file every caller is identified by its peer address (``ipv4:1.2.3.4``, port
dropped), which is what per-client concurrency limits count.

Tokens are compared in constant time. They travel in the clear unless TLS is on; the server warns when
tokens are configured without TLS on a non-loopback address.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cloud_server.errors import Overloaded
from splitinfer.errors import ConfigError, Unauthenticated

AUTH_HEADER = "authorization"
SCHEME = "bearer"
_NAME = re.compile(r"[A-Za-z0-9._-]+")


def load_tokens(path: Path) -> dict[str, str]:
    """``{token: client name}`` from a tokens file (see the module docstring); refuses an empty file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read auth tokens file {path}: {exc}") from exc
    tokens: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = line.partition(":")
        if not sep:
            name, token = "", name
        name, token = name.strip(), token.strip()
        if name and not _NAME.fullmatch(name):
            raise ConfigError(f"{path}:{number}: client name {name!r} may hold only letters, digits and '._-' "
                              "(a token containing ':' is written ':TOKEN')")
        if len(token) < 16:
            raise ConfigError(f"{path}:{number}: token shorter than 16 characters")
        if any(c.isspace() for c in token):
            raise ConfigError(f"{path}:{number}: token contains whitespace, which no Bearer header can carry")
        if token in tokens:
            raise ConfigError(f"{path}:{number}: token listed twice")
        tokens[token] = name or "token-" + hashlib.sha256(token.encode()).hexdigest()[:8]
    if not tokens:
        raise ConfigError(f"auth tokens file {path} holds no token")
    return tokens


def peer_identity(peer: str) -> str:
    """``ipv4:127.0.0.1:5555`` -> ``ipv4:127.0.0.1`` (one identity per host, not per connection)."""
    if peer.startswith("ipv6:["):
        return peer.split("]")[0] + "]"
    if peer.count(":") >= 2:
        return peer.rsplit(":", 1)[0]
    return peer or "unknown"


class Authenticator:
    """Identifies callers from metadata (bearer token) or, without tokens, from the peer address."""

    def __init__(self, tokens: dict[str, str] | None = None):
        self.tokens = tokens or {}

    @property
    def required(self) -> bool:
        """True when calls must carry a token."""
        return bool(self.tokens)

    def identify(self, metadata: Iterable[tuple[str, str | bytes]] | None, peer: str) -> str:
        """The caller's identity; raises :class:`Unauthenticated` for a missing or unknown token."""
        if not self.tokens:
            return peer_identity(peer)
        header = None
        for key, value in metadata or ():
            if key.lower() == AUTH_HEADER:
                header = value.decode("latin-1") if isinstance(value, bytes) else value
                break
        if header is None:
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != SCHEME or not token.strip():
            raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
        token = token.strip()
        for known, name in self.tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return name
        raise Unauthenticated("unknown bearer token")


class ClientLimiter:
    """At most ``limit`` requests of one client at once (0: unlimited); more get RESOURCE_EXHAUSTED."""

    def __init__(self, limit: int = 0):
        self.limit = limit
        self.active: Counter[str] = Counter()

    @contextmanager
    def slot(self, client: str) -> Iterator[None]:
        """Hold one of ``client``'s slots for the duration of the block."""
        if self.limit and self.active[client] >= self.limit:
            raise Overloaded(f"client {client!r} already has {self.limit} requests in flight "
                             f"(max_concurrency_per_client); retry later")
        self.active[client] += 1
        try:
            yield
        finally:
            self.active[client] -= 1
            if self.active[client] <= 0:
                del self.active[client]
