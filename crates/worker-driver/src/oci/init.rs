//! The first process of a worker's container: Steward's own binary, run
//! as `steward __oci-worker-init -- <program> <args>` (bound read-only into
//! the container). A pid namespace's first process gets no signal it has
//! no handler for, and must reap every orphan in the namespace; a Python
//! worker does neither. So this init forks the worker, forwards
//! termination signals to it, reaps every child, and exits with the
//! worker's code (128 + the signal's number when a signal killed it).
//!
//! It also asks the kernel for SIGKILL when its parent dies. Its parent is
//! Steward itself: Steward is a child subreaper under the OCI driver, and
//! the runtime's `create` has exited (so the container's init was handed
//! to Steward) before `start` lets this code run. Killing a pid
//! namespace's first process kills everything in it, so a SIGKILLed
//! Steward leaves no worker running (the container's state, bundle and
//! cgroup are removed by the next start).
//!
//! Must not know about: the runtime, bundles, gRPC.

use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicI32, Ordering};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork};

/// The argument that makes Steward's binary this init.
pub const WORKER_INIT_ARG: &str = "__oci-worker-init";
/// Exit code when the worker program cannot be executed (as shells use).
const EXEC_FAILED: i32 = 127;

/// Where termination signals go, for the signal handler.
static FORWARD_TO: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(signal: libc::c_int) {
    let pid = FORWARD_TO.load(Ordering::Relaxed);
    if pid > 0 {
        #[allow(unsafe_code)]
        // SAFETY: kill(2) is async-signal-safe.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// When Steward's binary was started as the container's init (its first
/// argument is [`WORKER_INIT_ARG`]), runs it and returns its exit code;
/// `None` otherwise. Call first thing in `main`, before any thread starts.
pub fn worker_init_if_asked() -> Option<i32> {
    let mut args = std::env::args_os().skip(1);
    if args.next()? != WORKER_INIT_ARG {
        return None;
    }
    let mut rest: Vec<OsString> = args.collect();
    if rest.first().is_some_and(|a| a == "--") {
        rest.remove(0);
    }
    Some(run(&rest))
}

fn say(what: &str) {
    eprintln!("steward worker init: {what}");
}

/// Forks and execs `argv`, then forwards signals and reaps until it ends.
fn run(argv: &[OsString]) -> i32 {
    if argv.is_empty() {
        say("no program given");
        return EXEC_FAILED;
    }
    #[allow(unsafe_code)]
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        say(&format!(
            "PR_SET_PDEATHSIG: {}",
            std::io::Error::last_os_error()
        ));
    }
    let Ok(args) = argv
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<Vec<CString>, _>>()
    else {
        say("an argument holds a NUL byte");
        return EXEC_FAILED;
    };
    if let Err(e) = forward_signals() {
        say(&format!("sigaction: {e}"));
    }
    #[allow(unsafe_code)]
    // SAFETY: this process has one thread (called first in main), so the
    // child is a faithful copy; it only calls execvp and _exit.
    let forked = unsafe { fork() };
    let worker = match forked {
        Ok(ForkResult::Child) => {
            let _ = nix::unistd::execvp(&args[0], &args);
            #[allow(unsafe_code)]
            // SAFETY: _exit is async-signal-safe.
            unsafe {
                libc::_exit(EXEC_FAILED)
            }
        }
        Ok(ForkResult::Parent { child }) => child,
        Err(e) => {
            say(&format!("fork: {e}"));
            return EXEC_FAILED;
        }
    };
    forward_to(worker);
    reap_until(worker).unwrap_or(EXEC_FAILED)
}

/// Forwards the termination signals this process gets (TERM, INT, HUP,
/// QUIT, USR1, USR2) to the pid set with [`forward_to`] (none before).
/// For a first process (of a pid namespace, or Steward as a container's
/// PID 1), which gets no signal it has no handler for.
pub fn forward_signals() -> nix::Result<()> {
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
        #[allow(unsafe_code)]
        // SAFETY: the handler only calls kill(2).
        unsafe { sigaction(signal, &action) }?;
    }
    Ok(())
}

/// Where [`forward_signals`] sends what it gets.
pub fn forward_to(pid: Pid) {
    FORWARD_TO.store(pid.as_raw(), Ordering::Relaxed);
}

/// Reaps every child (orphans included) until `child` ends: its exit code,
/// or 128 + the number of the signal that killed it; `None` when no child
/// is left.
pub fn reap_until(child: Pid) -> Option<i32> {
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == child => return Some(code),
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == child => {
                return Some(128 + signal as i32);
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return None,
        }
    }
}

/// Describes how the container's init ended: its code carries the
/// worker's (128 + N for a worker killed by signal N), and the init itself
/// may have been killed (the stop's SIGKILL, an OOM kill).
pub fn describe_init_status(status: &WaitStatus) -> String {
    let signal_name = |n: i32| Signal::try_from(n).map(|s| s.as_str()).unwrap_or("unknown");
    match *status {
        WaitStatus::Exited(_, code) if code > 128 && code - 128 < 65 => {
            let n = code - 128;
            format!("killed by signal {n} ({})", signal_name(n))
        }
        WaitStatus::Exited(_, EXEC_FAILED) => {
            format!(
                "exited with code {EXEC_FAILED} (its program could not be executed in the container)"
            )
        }
        WaitStatus::Exited(_, code) => format!("exited with code {code}"),
        WaitStatus::Signaled(_, s, _) => {
            format!("killed by signal {} ({})", s as i32, s.as_str())
        }
        _ => "exited".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::unistd::Pid;

    #[test]
    fn exits_are_described_as_the_process_driver_does() {
        let p = Pid::from_raw(7);
        assert_eq!(
            describe_init_status(&WaitStatus::Exited(p, 1)),
            "exited with code 1"
        );
        assert_eq!(
            describe_init_status(&WaitStatus::Exited(p, 137)),
            "killed by signal 9 (SIGKILL)"
        );
        assert_eq!(
            describe_init_status(&WaitStatus::Signaled(p, Signal::SIGKILL, false)),
            "killed by signal 9 (SIGKILL)"
        );
        assert!(
            describe_init_status(&WaitStatus::Exited(p, 127)).contains("could not be executed")
        );
    }
}
