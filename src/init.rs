//! Steward as a container's PID 1: orphans (processes whose parent exited,
//! such as what a worker's user code left running) are re-parented to
//! PID 1, and only PID 1 can reap them; a PID 1 that does not leaves
//! zombies that fill the pid table. So when Steward finds itself PID 1 it
//! forks: the parent stays PID 1, forwards termination signals to the
//! agent, reaps every orphan, and exits with the agent's status; the child
//! runs the agent as usual. `STEWARD_NO_INIT=1` turns this off (when a
//! real init such as tini runs Steward).

use std::sync::atomic::{AtomicI32, Ordering};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork};

/// The agent's pid, for the signal handler.
static AGENT: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(signal: libc::c_int) {
    let pid = AGENT.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

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
    AGENT.store(agent.as_raw(), Ordering::Relaxed);
    let action = SigAction::new(
        SigHandler::Handler(forward),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        // SAFETY: the handler only calls kill(2).
        #[allow(unsafe_code)]
        unsafe { sigaction(signal, &action) }?;
    }
    Ok(Some(reap_until_agent_exits(agent)))
}

/// Reaps every child (the agent and adopted orphans) until the agent ends.
fn reap_until_agent_exits(agent: Pid) -> i32 {
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == agent => return code,
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == agent => return 128 + signal as i32,
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return 1, // No children left: the agent is gone.
        }
    }
}
