//! Repository hygiene, checked as an ordinary test: every crate root opens
//! with a `//!` header saying what it owns, and every source file is
//! formatted as `cargo fmt` would (this test runs `cargo fmt --check`).

use std::path::Path;
use std::process::Command;

#[test]
fn every_source_file_is_formatted() {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let out = Command::new(&cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["fmt", "--all", "--", "--check", "--color", "never"])
        .output()
        .unwrap_or_else(|e| panic!("running {} fmt: {e}", cargo.display()));
    assert!(
        out.status.success(),
        "`cargo fmt --all -- --check` failed (run `cargo fmt --all`; rustfmt must be installed):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_crate_root_has_a_module_header() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut roots = vec![root.join("src/main.rs"), root.join("xtask/src/main.rs")];
    for entry in std::fs::read_dir(root.join("crates"))
        .expect("crates dir")
        .flatten()
    {
        let lib = entry.path().join("src/lib.rs");
        roots.push(if lib.exists() {
            lib
        } else {
            entry.path().join("src/main.rs")
        });
    }
    let missing: Vec<String> = roots
        .iter()
        .filter(|p| !std::fs::read_to_string(p).is_ok_and(|s| s.starts_with("//!")))
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "crate roots without a //! header: {missing:?}"
    );
}
