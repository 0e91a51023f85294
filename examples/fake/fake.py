"""Function names understood by `steward-fake-worker` (the native fake
function executor used by fault tests and benchmarks). The worker ignores
the code and acts on the function's name; this file only gives the dev
control plane a manifest to deploy. Running it under the real tensorlake
worker is not intended."""

from tensorlake.applications import application, function


@application()
@function()
def echo(x: str) -> str:
    """Returns its input."""


@application()
@function()
def noop(x: str) -> None:
    """Returns null at once."""


@application()
@function()
def fail(x: str) -> str:
    """Fails with a function error."""


@application()
@function()
def hang(x: str) -> str:
    """Never finishes (for timeouts and cancellation)."""


@application()
@function()
def crash(x: str) -> str:
    """The worker process exits while running it."""


@application()
@function()
def unhealthy(x: str) -> str:
    """The worker reports itself unhealthy after initialization."""


@application()
@function()
def init_fail(x: str) -> str:
    """Initialization fails with a function error."""


@application()
@function()
def init_hang(x: str) -> str:
    """Initialization never finishes."""


@application()
@function()
def sleep_200(x: str) -> str:
    """Sleeps 200 ms, then returns its input."""


@application()
@function()
def sleep_1500(x: str) -> str:
    """Sleeps 1.5 s, then returns its input."""


@application()
@function()
def no_upload(x: str) -> str:
    """Reports success with a value it never uploaded."""


@application()
@function()
def huge_output(x: str) -> str:
    """Asks for a u64::MAX-byte output blob."""


@application()
@function()
def fuzz(seed: int) -> str:
    """Publishes hostile allocation states chosen by the seed, then a random result."""


@application()
@function()
def huge_state(x: str) -> str:
    """Publishes one 2 MiB allocation state, then never finishes."""


@application()
@function()
def gate(path: str) -> str:
    """Returns its input once the file it names exists (tests open the gate)."""


@application()
@function()
def burn_1500(x: str) -> str:
    """Spins two threads on the CPU for 1.5 s; returns {"wall_ms", "cpu_ms"} (process CPU time used)."""


@application()
@function()
def forkbomb(x: str) -> str:
    """Spawns `sleep`s until a spawn fails (or 100,000 run), kills and reaps them all; returns {"spawned", "error"}."""


@application()
@function()
def alloc_256(x: str) -> str:
    """Allocates and touches 256 MiB, holds it 200 ms; returns {"allocated_mib": 256}."""


@application()
@function()
def burn_2000(x: str) -> str:
    """Spins two threads on the CPU for 2 s; returns {"wall_ms", "cpu_ms"} (metering tests)."""


@application()
@function()
def hold_256(x: str) -> str:
    """Allocates and touches 256 MiB, holds it 3 s; returns {"allocated_mib", "held_ms"} (metering tests)."""


@application()
@function()
def sleep_20(x: str) -> str:
    """Sleeps 20 ms (the metering crash loop's steady stream of finishes)."""


@application()
@function()
def huge_content_type(x: str) -> str:
    """Returns its input, a number n, declaring an n MiB content type (the agent must fail it by name)."""


@application()
@function()
def huge_watches(x: str) -> str:
    """Input [count, bytes]: waits on that many function calls, every id that many bytes long (the agent must fail it by name)."""


@application()
@function()
def many_outputs(x: str) -> str:
    """Input n: asks for n output blobs besides its output, then echoes (over the per-allocation limit, the agent fails it by name)."""


@application()
@function()
def many_writes(x: str) -> str:
    """Input n: prepares n request-state writes, then echoes (over the per-allocation limit, the agent fails it by name)."""


@application()
@function()
def many_reads(x: str) -> str:
    """Input n: asks for n request-state reads, then echoes (over the per-allocation limit, the agent fails it by name)."""


@application()
@function()
def many_calls(x: str) -> str:
    """Input [n, kib]: makes n nested calls of noop, each with kib KiB of call metadata, then echoes."""


@application()
@function()
def foreign_call(x: str) -> str:
    """Calls noop in another namespace, then echoes (the agent fails it by name)."""
