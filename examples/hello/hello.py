"""Demo application for Steward: Tensorlake 0.3.9 functions run by the real
`function-executor` worker under Steward, deployed to the dev control plane
with `steward devserver deploy examples/hello`."""

import os

from tensorlake.applications import application, function


@application()
@function(description="Greets someone by name")
def greet(name: str) -> str:
    return f"Hello, {name}!"


@application()
@function(description="Sums the squares of a list of integers")
def sum_of_squares(numbers: list[int]) -> int:
    return sum(n * n for n in numbers)


@application()
@function(description="Always fails: shows how a function error is reported")
def explode(reason: str) -> str:
    raise ValueError(f"exploding on purpose: {reason}")


@application()
@function(description="Reports which GPUs the worker was given")
def visible_gpus(_: str) -> str:
    return os.environ.get("CUDA_VISIBLE_DEVICES", "")


@application()
@function(description="Returns its input twice (used to move large payloads through the blob store)")
def echo_twice(text: str) -> str:
    return text + text


@application()
@function(description="Starts a background `sleep` (like user code that forks) and returns its pid")
def spawn_sleeper(seconds: int) -> int:
    import subprocess

    return subprocess.Popen(["sleep", str(seconds)]).pid


@application()
@function(description="Leaves an orphan: a `sleep` whose parent shell has already exited; returns its pid")
def orphan_sleeper(seconds: float) -> int:
    import subprocess

    out = subprocess.run(
        ["sh", "-c", f"sleep {seconds} >/dev/null 2>&1 & echo $!"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip())


@application()
@function(description="Marks that it started (`path`.started), runs until the file `path` exists, then removes it and returns its text (a long function, released when a test says so)")
def wait_for_file(path: str) -> str:
    import time

    with open(path + ".started", "w"):
        pass
    while not os.path.exists(path):
        time.sleep(0.05)
    with open(path) as f:
        text = f.read()
    os.remove(path)
    return text


@application()
@function(description="Allocates and touches `mib` MiB (used to test memory limits)")
def hog(mib: int) -> int:
    data = bytearray(b"x") * (mib << 20)
    return len(data)
