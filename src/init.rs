//! Steward as a container's PID 1: orphans (processes whose parent exited,
//! such as what a worker's user code left running) are re-parented to
//! PID 1, and only PID 1 can reap them; a PID 1 that does not leaves
//! zombies that fill the pid table. So when Steward finds itself PID 1 it
//! forks: the parent stays PID 1, forwards termination signals to the
//! agent, reaps every orphan, and exits with the agent's status; the child
//! runs the agent as usual. `STEWARD_NO_INIT=1` turns this off (when a
//! real init such as tini runs Steward).

use nix::unistd::{ForkResult, fork};
use steward_worker_driver::oci::init::{forward_signals, forward_to, reap_until};

/// Returns `None` in the process that should run the agent; in the PID-1
/// supervisor it returns the exit code once the agent has exited.
pub fn supervise_if_pid1() -> anyhow::Result<Option<i32>> {
    if std::process::id() != 1 || std::env::var_os("STEWARD_NO_INIT").is_some() {
        return Ok(None);
    }
    // SAFETY: called first thing in main, before any thread exists, so the
    // child is a faithful copy with nothing half-locked.
    #[allow(unsafe_code)]
    let forked = unsafe { fork() }?;
    let agent = match forked {
        ForkResult::Child => return Ok(None),
        ForkResult::Parent { child } => child,
    };
    forward_to(agent);
    forward_signals()?;
    // No child left: the agent is gone.
    Ok(Some(reap_until(agent).unwrap_or(1)))
}
