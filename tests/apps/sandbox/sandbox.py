"""Probes of a worker's sandbox, run by the real `function-executor` in
tests/oci.rs: each function reports what the worker could see or do from
inside, so the test can check it from both sides."""

import errno
import os
import socket
import subprocess
import sys

from tensorlake.applications import application, function


_UNSHARE_USER = """
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x10000000) == 0:  # CLONE_NEWUSER
    print("ok")
else:
    e = ctypes.get_errno()
    print(errno.errorcode.get(e, str(e)))
"""


def _attempt(action) -> str:
    try:
        action()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def _write(path: str) -> None:
    with open(path, "w") as f:
        f.write("x")


@application()
@function(description="What the worker sees of its sandbox")
def probe(host_port: int) -> dict:
    # unshare(CLONE_NEWUSER) in a fresh, single-threaded process (the
    # worker has threads, and a threaded process gets EINVAL anyway).
    child = subprocess.run(
        [sys.executable, "-c", _UNSHARE_USER],
        capture_output=True,
        text=True,
        check=False,
    )

    def connect() -> None:
        socket.create_connection(("127.0.0.1", host_port), timeout=2).close()

    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "uid": os.getuid(),
        "root": _attempt(lambda: _write("/probe")),
        "usr": _attempt(lambda: _write("/usr/probe")),
        "etc": _attempt(lambda: _write("/etc/probe")),
        "tmp": _attempt(lambda: _write("/tmp/probe")),
        "home": _attempt(lambda: _write(os.path.join(os.environ["HOME"], "probe"))),
        "host_tcp": _attempt(connect) if host_port else "skipped",
        "unshare_user": child.stdout.strip() or child.stderr.strip(),
        "dev": sorted(os.listdir("/dev")),
        "processes": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    }


@application()
@function(description="Allocates and holds memory (MiB), past its limit an OOM kill")
def hog(mib: int) -> int:
    blocks = [bytearray(1 << 20) for _ in range(mib)]
    for b in blocks:
        b[::4096] = b"x" * len(b[::4096])
    return len(blocks)


@application()
@function(description="Ends its worker with an exit code")
def exit_with(code: int) -> int:
    os._exit(code)
