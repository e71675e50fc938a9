"""The sockets clients connect to: listen_addresses x port, and unix_socket_directories.

Binding follows PostgreSQL's postmaster: every address that can be bound is used,
one that cannot is a WARNING, and having none at all is FATAL.
"""
from __future__ import annotations

import errno
import os
import socket

from . import log
from .errors import StartupError

_BACKLOG = 1024
# sizeof(sockaddr_un.sun_path) - 1, as PostgreSQL's UNIXSOCK_PATH_BUFLEN
_UNIX_PATH_MAX = 107


def _addresses(host: str, port: int) -> list[tuple[int, str]]:
    if host == "*":
        candidates = [(socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")]
        return [c for c in candidates if c[0] != socket.AF_INET6 or socket.has_ipv6]
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    seen = []
    for family, _, _, _, sockaddr in infos:
        if (family, sockaddr[0]) not in seen and family in (socket.AF_INET, socket.AF_INET6):
            seen.append((family, sockaddr[0]))
    return seen


def _bind_tcp(family: int, address: str, port: int, reuse_port: bool = False) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        sock.listen(_BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _bind_group(family: int, address: str, port: int, copies: int) -> list[socket.socket]:
    """One listening socket, or `copies` sharing the address with SO_REUSEPORT (one accept
    queue per worker). A plain bind first: SO_REUSEPORT would also share the port with
    another process that set it, and the port must be ours alone."""
    if copies == 1:
        return [_bind_tcp(family, address, port)]
    _bind_tcp(family, address, port).close()
    group: list[socket.socket] = []
    try:
        for _ in range(copies):
            group.append(_bind_tcp(family, address, port, reuse_port=True))
    except OSError:
        for sock in group:
            sock.close()
        raise
    return group


def bind_tcp(listen_addresses: tuple[str, ...], port: int, copies: int = 1) -> list[list[socket.socket]]:
    """The listening sockets for each of `copies` workers (one list per worker)."""
    sockets: list[list[socket.socket]] = []
    for host in listen_addresses:
        try:
            addresses = _addresses(host, port)
        except socket.gaierror as exc:
            log.warning(f'could not translate host name "{host}", service "{port}" to address: {exc.strerror}')
            continue
        for family, address in addresses:
            kind = "IPv4" if family == socket.AF_INET else "IPv6"
            try:
                sockets.append(_bind_group(family, address, port, copies))
            except OSError as exc:
                hint = None
                if exc.errno == errno.EADDRINUSE:
                    hint = f"Is another postmaster already running on port {port}? If not, wait a few seconds and retry."
                log.emit("LOG", f'could not bind {kind} address "{address}": {exc.strerror}', hint=hint)
                log.warning(f'could not create listen socket for "{host}"')
                continue
            log.log(f'listening on {kind} address "{address}", port {port}')
    if listen_addresses and not sockets:
        raise StartupError("could not create any TCP/IP sockets")
    return [[group[i] for group in sockets] for i in range(copies)]


def _socket_in_use(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def bind_unix(directories: tuple[str, ...], port: int) -> list[tuple[socket.socket, str]]:
    bound = []
    for directory in directories:
        path = os.path.join(directory, f".s.PGSQL.{port}")
        if len(os.fsencode(path)) > _UNIX_PATH_MAX:
            log.log(f'Unix-domain socket path "{path}" is too long (maximum {_UNIX_PATH_MAX} bytes)')
            continue
        if _socket_in_use(path):
            raise StartupError(f'could not bind Unix address "{path}": Address already in use',
                               hint=f"Is another postmaster already running on port {port}?")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if os.path.exists(path):
                os.unlink(path)       # stale: nobody answered on it
            sock.bind(path)
            os.chmod(path, 0o777)     # PostgreSQL's unix_socket_permissions default
            sock.listen(_BACKLOG)
        except OSError as exc:
            sock.close()
            log.warning(f'could not create Unix-domain socket in directory "{directory}"',
                        detail=f'could not bind Unix address "{path}": {exc.strerror}')
            continue
        sock.setblocking(False)
        log.log(f'listening on Unix socket "{path}"')
        bound.append((sock, path))
    if directories and not bound:
        raise StartupError("could not create any Unix-domain sockets")
    return bound
