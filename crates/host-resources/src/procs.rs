//! The process tree, read from `/proc`: used to find every process a
//! program started, including ones that moved to process groups of their
//! own (the reference executor's workers do).

/// Parent pid of `pid`, from `/proc/<pid>/stat` (after the command name,
/// which may itself contain spaces and parentheses).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Every live descendant of `root` (children first), empty where `/proc`
/// cannot be read.
pub fn descendants(root: u32) -> Vec<u32> {
    let pids: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter_map(|pid| Some((pid, parent_of(pid)?)))
        .collect();
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(pid, parent) in &pids {
            if parent == p && !out.contains(&pid) {
                out.push(pid);
                frontier.push(pid);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_grandchildren() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & wait"])
            .spawn()
            .expect("spawn sh");
        let me = std::process::id();
        let sh = child.id();
        // The grandchild appears once sh has forked it.
        let mut found = Vec::new();
        for _ in 0..500 {
            found = descendants(me);
            if found.len() >= 2 {
                break;
            }
            std::thread::yield_now();
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(found.contains(&sh), "{found:?}");
        let grandchild = descendants(sh);
        assert_eq!(grandchild.len(), 1, "{grandchild:?}");
        for p in grandchild {
            let _ = std::process::Command::new("kill")
                .args(["-9", &p.to_string()])
                .status();
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}
