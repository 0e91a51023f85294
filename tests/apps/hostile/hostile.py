"""A worker that attacks Steward, the other workers and the host's network,
run by the real `function-executor` in tests/hostile.rs under both drivers:
each attempt reports what it got ("ok" or the errno's name), so the test
sees every failure from inside as well as from outside."""

import errno
import os
import socket

from tensorlake.applications import application, function


def _attempt(action) -> str:
    try:
        action()
        return "ok"
    except OSError as e:
        if e.errno is None:  # a timeout
            return type(e).__name__
        return errno.errorcode.get(e.errno, str(e.errno))


def _read(path: str) -> None:
    with open(path, "rb") as f:
        f.read(1)


def _connect(path: str) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(2)
    try:
        s.connect(path)
    finally:
        s.close()


def _connect_tcp(address: list) -> None:
    host, port = address
    socket.create_connection((host, int(port)), timeout=2).close()


@application()
@function(description="Tries each attack the test names; says what each got")
def attack(targets: dict) -> dict:
    steward = int(targets["steward_pid"])
    got = {
        "uid": os.getuid(),
        "steward_environ": _attempt(lambda: _read(f"/proc/{steward}/environ")),
        # Signal 0 asks the kernel whether a signal would be allowed,
        # without sending one.
        "signal_steward": _attempt(lambda: os.kill(steward, 0)),
    }
    for name, path in targets.get("files", {}).items():
        got[name] = _attempt(lambda p=path: _read(p))
    for name, path in targets.get("sockets", {}).items():
        got[name] = _attempt(lambda p=path: _connect(p))
    for name, address in targets.get("tcp", {}).items():
        got[name] = _attempt(lambda a=address: _connect_tcp(a))
    return got
