"""Composed application for Steward: every way a Tensorlake 0.3.9 function
can use other functions of its application, run by the real
`function-executor` under Steward (`cargo xtask demo` deploys it to the dev
control plane with `steward devserver deploy examples/compose`).

Each `@application()` below is one construct; the plain `@function()`s are
the children they call.
"""

import time

from tensorlake.applications import RequestContext, application, function


@function(description="Squares a number")
def square(x: int) -> int:
    return x * x


@function(description="Adds two numbers (the reducer)")
def add(a: int, b: int) -> int:
    return a + b


@function(description="Sleeps, then squares (a child slower than its parent's patience)")
def slow_square(x: int) -> int:
    time.sleep(2)
    return x * x


@function(description="Always fails")
def broken(x: int) -> int:
    raise ValueError(f"child fails on purpose with {x}")


@function(description="Reads request state written by another function")
def read_state(key: str) -> str:
    state = RequestContext.get().state
    return f"{state.get(key)}; missing key -> {state.get('never-set', 'default')}"


@application()
@function(description="Blocking nested call: square(x) + 1")
def nested(x: int) -> int:
    return square(x) + 1


@application()
@function(description="Tail call: the request's output is square(x)")
def tail(x: int) -> int:
    return square.awaitable(x)


@application()
@function(description="Map: squares of 1..n")
def map_squares(n: int) -> list:
    return square.map(list(range(1, n + 1)))


@application()
@function(description="Reduce: 1 + 2 + ... + n by a chain of add calls")
def reduce_sum(n: int) -> int:
    return add.reduce(list(range(1, n + 1)))


@application()
@function(description="Futures: one waited in time, one whose wait times out")
def futures(x: int) -> str:
    fast = square.awaitable(x).run()
    slow = slow_square.awaitable(x).run()
    try:
        slow.result(timeout=0.2)
        slow_outcome = "in time"
    except Exception as e:  # tensorlake's TimeoutError
        slow_outcome = type(e).__name__
    return f"fast={fast.result(timeout=120)} slow={slow_outcome}"


@application()
@function(description="Request state: set here, read by a child")
def state_roundtrip(name: str) -> str:
    RequestContext.get().state.set("greeting", f"hello {name}")
    return read_state("greeting")


@application()
@function(description="A failing child fails the whole request")
def failing_child(x: int) -> int:
    return broken(x) + 1


@application()
@function(description="Catches a failure to start a child (the agent says why)")
def guarded(x: int) -> str:
    try:
        return f"ok {square(x)}"
    except Exception as e:
        return f"caught {type(e).__name__}: {e}"
