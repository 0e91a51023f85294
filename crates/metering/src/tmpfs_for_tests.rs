//! A small tmpfs for tests of a full disk: mounted on a temporary
//! directory (Steward's tests run as root), filled up by a filler file
//! and given space back by removing it; unmounted on drop, also when the
//! test fails.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

pub(crate) struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// A tmpfs of `bytes` on a fresh temporary directory.
    pub(crate) fn mount(bytes: u64) -> Tmpfs {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "mounting a tmpfs on {} (these tests run as root): {status}",
            dir.path().display()
        );
        Tmpfs { dir }
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    fn filler(&self) -> PathBuf {
        self.path().join("filler")
    }

    /// Fills what space is left with a filler file.
    pub(crate) fn fill(&self) {
        let mut f = std::fs::File::create(self.filler()).expect("filler");
        let chunk = vec![1u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        // The last partial chunk may sit in no block: write byte by byte.
        while f.write_all(&[1]).is_ok() {}
    }

    /// Gives the filler's space back.
    pub(crate) fn free(&self) {
        std::fs::remove_file(self.filler()).expect("removing the filler");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Something still holds it open: detach it now, gone once closed.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}
