"""Local TCP ports: is one free, and a free one (the demo's web port, tests, benchmarks).

>>> port = free_port()
>>> 1024 <= port < 65536 and port_free("127.0.0.1", port)
True
"""

from __future__ import annotations

import socket


def port_free(host: str, port: int) -> bool:
    """Whether ``host:port`` can be bound right now."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


#: Bind addresses that mean "every interface": a client on this host reaches them on loopback.
WILDCARD_BINDS = ("", "0.0.0.0", "::")


def local_url(bind: str, port: int, path: str = "") -> str:
    """The URL a client on this host uses for a server bound to ``bind:port`` (a wildcard bind is
    asked on loopback; an IPv6 address gets its brackets).

    >>> local_url("0.0.0.0", 7001, "/metrics"), local_url("::1", 6066), local_url("10.0.0.5", 80, "/x")
    ('http://127.0.0.1:7001/metrics', 'http://[::1]:6066', 'http://10.0.0.5:80/x')
    """
    host = "127.0.0.1" if bind in WILDCARD_BINDS else bind
    return f"http://{f'[{host}]' if ':' in host else host}:{port}{path}"
