"""Whether a local port can be listened on, checked before starting what would listen there."""

from __future__ import annotations

import socket


def bind_error(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound right now (e.g. "Address already in use"), or None.

    SO_REUSEADDR, as servers set it: a port that only has connections in TIME_WAIT is free.
    """
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            return error.strerror or str(error)
    return None


def free_port(host: str, preferred: int | None = None) -> int:
    """``preferred`` when it can be bound on ``host``, else a port the kernel picks."""
    if preferred is not None and bind_error(host, preferred) is None:
        return preferred
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def address_host(address: str) -> str:
    """The host of ``host:port`` or ``ray://host:port`` (the text itself when it has no port)."""
    bare = address.removeprefix("ray://")
    return bare.rpartition(":")[0] or bare
