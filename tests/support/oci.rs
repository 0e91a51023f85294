//! Helpers for tests that run workers under `--worker-driver oci` on the
//! machine's real `runc` (tests/oci.rs, tests/hostile.rs): the check that
//! this test can run containers, the containers a Steward runs, and the
//! sweep of what a failed test's Steward left.

use std::path::{Path, PathBuf};

use super::{AgentProc, cgroup_dirs_named, remove_cgroup_tree};

/// The runtime every test uses.
pub const RUNC: &str = "runc";

/// Fails unless this test can run containers: root and `runc`.
pub fn require_runc() {
    assert!(
        steward_worker_driver::identity::steward_uid() == 0,
        "the OCI driver's tests need root (runc creates namespaces and cgroups); `cargo xtask test` runs as root"
    );
    let ok = std::process::Command::new(RUNC)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "`{RUNC} --version` failed: install runc (apt-get install runc; `cargo xtask test` does)"
    );
}

/// Steward's arguments for the OCI driver, plus `extra`.
pub fn oci_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--worker-driver", "oci", "--oci-runtime", RUNC];
    args.extend_from_slice(extra);
    args
}

/// The runtime state root and bundles of a Steward's data directory.
pub fn oci_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("oci")
}

/// Containers listed under `root` (the runtime's `--root`).
pub fn containers(root: &Path) -> Vec<serde_json::Value> {
    if !root.exists() {
        return Vec::new();
    }
    let out = std::process::Command::new(RUNC)
        .arg("--root")
        .arg(root)
        .args(["list", "--format", "json"])
        .output();
    let Ok(out) = out else {
        return Vec::new();
    };
    serde_json::from_slice::<Option<Vec<serde_json::Value>>>(&out.stdout)
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// Deletes what a test's Steward left (after a failure, or a Steward the
/// harness SIGKILLs): its containers, and its parent cgroups in every
/// hierarchy with what they hold (processes killed first).
pub struct Sweep {
    pub root: PathBuf,
    pub parents: Vec<String>,
    /// Worker logs, printed if the test fails.
    pub logs: PathBuf,
}

impl Drop for Sweep {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Ok(entries) = std::fs::read_dir(&self.logs)
        {
            for e in entries.filter_map(Result::ok) {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                eprintln!("---- {} ----\n{text}", e.path().display());
            }
        }
        for c in containers(&self.root) {
            if let Some(id) = c["id"].as_str() {
                let _ = std::process::Command::new(RUNC)
                    .arg("--root")
                    .arg(&self.root)
                    .args(["delete", "--force", id])
                    .output();
            }
        }
        for parent in &self.parents {
            for dir in cgroup_dirs_named(parent) {
                remove_cgroup_tree(&dir);
            }
        }
    }
}

impl Sweep {
    /// What `steward` may leave: its containers, cgroups and worker logs.
    pub fn of(steward: &AgentProc) -> Sweep {
        Sweep {
            root: oci_dir(steward.data_dir.path()).join("state"),
            parents: steward.cgroup_parent.clone().into_iter().collect(),
            logs: steward.data_dir.path().join("logs"),
        }
    }
}
