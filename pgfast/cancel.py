"""The cancel keys pgfast hands its clients, and which client session each belongs to.

A client's BackendKeyData is pgfast's own: the process ID is the backend's (so
pg_backend_pid() and the key agree) or, under transaction pooling, one of pgfast's
(above any real pid); the secret is random and never the backend's. A
CancelRequest is matched to the client session it was issued to, not to a backend:
that session forwards it only to the backend it holds at that moment, and the pool
reuses a backend only after every cancel forwarded for it has reached PostgreSQL, so
a cancel can never land on another client's query.
"""
from __future__ import annotations

import hmac
import secrets

from . import log


class CancelKeys:
    def __init__(self, shared=None):
        self._issued: dict[int, tuple[bytes, object]] = {}    # process ID -> (secret, session)
        self._shared = shared       # with several workers: which worker issued which process ID

    def issue(self, pid: int, session, length: int = 4) -> bytes:
        key = secrets.token_bytes(length)
        self._issued[pid] = (key, session)
        if self._shared is not None:
            self._shared.register_pid(pid)
        return key

    def issue_virtual(self, session, length: int = 4) -> tuple[int, bytes]:
        """A process ID and key for a client that has no backend of its own (transaction
        pooling): above Linux's largest pid (2^22), so never a backend's."""
        while True:
            pid = secrets.randbelow((1 << 31) - (1 << 22)) + (1 << 22)
            if pid not in self._issued and (self._shared is None or self._shared.owner_of(pid) is None):
                return pid, self.issue(pid, session, length)

    def forget(self, pid: int, session) -> None:
        entry = self._issued.get(pid)
        if entry is not None and entry[1] is session:
            del self._issued[pid]
            if self._shared is not None:
                self._shared.unregister_pid(pid)

    def session_for(self, pid: int, key: bytes):
        """The session a CancelRequest is for, or None (logged as PostgreSQL logs it)."""
        entry = self._issued.get(pid)
        if entry is None:
            log.log(f"PID {pid} in cancel request did not match any process")
            return None
        if not hmac.compare_digest(entry[0], key):
            log.log(f"wrong key in cancel request for process {pid}")
            return None
        return entry[1]
