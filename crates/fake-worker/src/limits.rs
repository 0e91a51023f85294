//! Functions that push against a worker's resource limits (CPU quota,
//! memory limit, pids limit), for cgroup tests. Each returns its JSON output
//! or why it could not run. `burn` and `forkbomb` block: run them off the
//! runtime thread.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `/proc/<pid>/stat` counts CPU time in `USER_HZ` ticks, which Linux fixes
/// at 100 per second in its ABI (`sysconf(_SC_CLK_TCK)`).
const MS_PER_TICK: u64 = 10;

/// The most children `forkbomb` spawns when no spawn fails.
const FORKBOMB_CAP: usize = 100_000;

/// How long `alloc_<mib>` holds its memory.
pub(crate) const ALLOC_HOLD: Duration = Duration::from_millis(200);
/// How long `hold_<mib>` holds its memory (long enough to meter).
pub(crate) const LONG_HOLD: Duration = Duration::from_secs(3);

/// CPU time (user + system) used so far by this whole process, every thread,
/// exited ones included, in milliseconds.
fn process_cpu_ms() -> Result<u64, String> {
    let stat =
        std::fs::read_to_string("/proc/self/stat").map_err(|e| format!("/proc/self/stat: {e}"))?;
    // The command name (field 2) is in parentheses and may hold spaces or
    // parentheses: fields are counted after its last ')'. Field 3 (state) is
    // first there, so utime (field 14) and stime (field 15) are 11th and 12th.
    let mut fields = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or("/proc/self/stat: no command name")?
        .split_whitespace()
        .skip(11);
    let mut ticks = || -> Result<u64, String> {
        fields
            .next()
            .and_then(|t| t.parse::<u64>().ok())
            .ok_or_else(|| "/proc/self/stat: no utime/stime".to_string())
    };
    Ok((ticks()? + ticks()?) * MS_PER_TICK)
}

/// `burn_<ms>`: two threads spin on the CPU for `wall` each, at once. Outputs
/// `{"wall_ms": W, "cpu_ms": C}`: the wall time it took and the CPU time the
/// whole process used meanwhile (about 2 × W unless a CPU quota throttles it).
pub(crate) fn burn(wall: Duration) -> Result<Vec<u8>, String> {
    let cpu_before = process_cpu_ms()?;
    let start = Instant::now();
    let spinners: Vec<_> = (0..2)
        .map(|i| {
            std::thread::Builder::new()
                .name(format!("burn-{i}"))
                .spawn(move || {
                    let mut x = 0u64;
                    while start.elapsed() < wall {
                        for _ in 0..10_000 {
                            x = std::hint::black_box(x.wrapping_mul(6364136223846793005) + 1);
                        }
                    }
                    x
                })
        })
        .collect();
    let mut failed = None;
    for spinner in spinners {
        match spinner {
            Ok(handle) => {
                if handle.join().is_err() {
                    failed = Some("a burn thread panicked".to_string());
                }
            }
            Err(e) => failed = Some(format!("starting a burn thread: {e}")),
        }
    }
    let wall_ms = start.elapsed().as_millis();
    if let Some(e) = failed {
        return Err(e);
    }
    let cpu_ms = process_cpu_ms()?.saturating_sub(cpu_before);
    Ok(format!(r#"{{"wall_ms": {wall_ms}, "cpu_ms": {cpu_ms}}}"#).into_bytes())
}

/// `forkbomb`: spawns `sleep 60` children until a spawn fails (a pids limit)
/// or `FORKBOMB_CAP` of them run, then kills and reaps every one. Outputs
/// `{"spawned": N, "error": "<why the next spawn failed>"}` (`null` at the cap).
/// The children share the worker's process group, so they die with it too.
pub(crate) fn forkbomb() -> Result<Vec<u8>, String> {
    let mut children: Vec<Child> = Vec::new();
    let mut error = None;
    while children.len() < FORKBOMB_CAP {
        let spawned = Command::new("sleep")
            .arg("60")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match spawned {
            Ok(child) => children.push(child),
            Err(e) => {
                error = Some(e.to_string());
                break;
            }
        }
    }
    let spawned = children.len();
    // Kill them all first, then reap: each is dead by the time it is waited for.
    for child in &mut children {
        if let Err(e) = child.kill() {
            eprintln!("fake worker: killing sleep {}: {e}", child.id());
        }
    }
    for mut child in children {
        if let Err(e) = child.wait() {
            eprintln!("fake worker: reaping sleep {}: {e}", child.id());
        }
    }
    let error = error
        .as_deref()
        .map_or_else(|| "null".to_string(), json_string);
    Ok(format!(r#"{{"spawned": {spawned}, "error": {error}}}"#).into_bytes())
}

/// `alloc_<mib>` (and `hold_<mib>`): allocates `mib` MiB, writes every page
/// (so it is resident and charged to the memory cgroup), holds it `hold`,
/// then outputs `{"allocated_mib": N, "held_ms": H}`, H from when the
/// last page was written. Past a memory limit the kernel kills the worker.
pub(crate) async fn alloc(mib: usize, hold: Duration) -> Result<Vec<u8>, String> {
    let bytes = mib
        .checked_mul(1 << 20)
        .ok_or_else(|| format!("{mib} MiB does not fit the address space"))?;
    let memory = tokio::task::spawn_blocking(move || {
        let mut memory: Vec<u8> = Vec::new();
        memory
            .try_reserve_exact(bytes)
            .map_err(|e| format!("allocating {mib} MiB: {e}"))?;
        // Fresh pages from the allocator are untouched: writing every byte
        // faults each one in (a page-sized copy at a time: quick unoptimized too).
        const PAGE: [u8; 4096] = [1; 4096];
        for _ in 0..bytes / PAGE.len() {
            memory.extend_from_slice(&PAGE);
        }
        Ok::<_, String>(std::hint::black_box(memory))
    })
    .await
    .map_err(|e| format!("blocking task: {e}"))??;
    let held = Instant::now();
    tokio::time::sleep(hold).await;
    drop(std::hint::black_box(memory));
    let held_ms = held.elapsed().as_millis();
    Ok(format!(r#"{{"allocated_mib": {mib}, "held_ms": {held_ms}}}"#).into_bytes())
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string(r#"a "b" \c"#), r#""a \"b\" \\c""#);
        assert_eq!(json_string("x\ny"), r#""x\u000ay""#);
    }

    #[test]
    fn process_cpu_time_is_readable() {
        assert!(process_cpu_ms().is_ok());
    }
}
