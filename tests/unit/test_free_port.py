"""scripts.localcluster.free_port: the ports the fixtures give the processes they start."""

from __future__ import annotations

import socket

from scripts import localcluster
from scripts.localcluster import free_port


def test_a_port_handed_out_is_not_handed_out_again_soon(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The kernel may give a port just released to the next bind(0); two nodes started
    one after the other were once both told the same port, and the second could not
    listen. A port this process handed out lately is never handed out again."""
    given = iter([41001, 41001, 41001, 41002])

    class Socket(socket.socket):
        def getsockname(self):  # type: ignore[no-untyped-def]
            return ("127.0.0.1", next(given))

    monkeypatch.setattr(localcluster.socket, "socket", Socket)
    monkeypatch.setattr(localcluster, "_HANDED_OUT", localcluster.collections.deque(maxlen=16))
    assert free_port() == 41001
    assert free_port() == 41002  # 41001 twice more from the kernel: skipped


def test_ports_are_free_and_distinct() -> None:
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    for port in ports[:5]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))  # free indeed
