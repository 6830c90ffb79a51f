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
