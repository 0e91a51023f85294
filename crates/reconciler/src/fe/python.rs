//! Learning the workers' Python version from the worker program itself.
//! (Starting, confining and stopping workers is the worker driver's job:
//! `steward-worker-driver`.)

use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

/// The (major, minor) version of the Python that runs `bin`, when `bin` is
/// a Python script (its `#!` line names the interpreter). Bounded: the
/// first line is read up to 4 KiB, the interpreter gets 10 s.
pub(crate) async fn probe_python_version(bin: &std::path::Path) -> Option<(String, String)> {
    let path = if bin.components().count() > 1 {
        bin.to_path_buf()
    } else {
        std::env::split_paths(&std::env::var_os("PATH")?)
            .map(|d| d.join(bin))
            .find(|p| p.is_file())?
    };
    let head = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut buf = vec![0u8; 4096];
        let n = std::fs::File::open(&path).ok()?.read(&mut buf).ok()?;
        buf.truncate(n);
        Some(buf)
    })
    .await
    .ok()??;
    let first = String::from_utf8_lossy(&head);
    let interpreter = first
        .lines()
        .next()?
        .strip_prefix("#!")?
        .split_whitespace()
        .next()?
        .to_string();
    if !interpreter.contains("python") {
        return None;
    }
    let out = Command::new(&interpreter)
        .args([
            "-c",
            "import sys; print(sys.version_info[0], sys.version_info[1])",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(10), out)
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text.split_whitespace();
    let (major, minor) = (parts.next()?, parts.next()?);
    let digits = |s: &str| !s.is_empty() && s.len() <= 4 && s.bytes().all(|b| b.is_ascii_digit());
    (digits(major) && digits(minor)).then(|| (major.to_string(), minor.to_string()))
}
