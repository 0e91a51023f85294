//! `cargo xtask package`: Steward's .deb, made by cargo-deb from
//! `[package.metadata.deb]` in the root `Cargo.toml` (the binary without
//! the dev control plane, the systemd unit, /etc/steward's conffiles, the
//! maintainer scripts in `deploy/debian/`). cargo-deb is installed at a
//! pinned version when it is missing.
//!
//! [`check`] is the package's test, run by `cargo xtask test` as root where
//! dpkg is: the maintainer scripts' systemd calls, then a real install,
//! upgrade, removal and purge on this host. It never starts Steward: with
//! no systemd running the scripts only enable the unit, and the calls a
//! running systemd would get are checked against stand-ins in a mount
//! namespace of their own.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, ensure};

use crate::{cargo, root, run, run_stdout, target_dir};

/// The cargo-deb every package is built with (`cargo install --locked`).
const CARGO_DEB_VERSION: &str = "3.8.0";

/// Builds the .deb with the given cargo profile and returns its path.
/// `release` (fat LTO) is what hosts get; the check builds from `dev`,
/// which cargo-deb still accepts with a warning, to keep CI short.
pub fn build(profile: &str) -> Result<PathBuf> {
    ensure_cargo_deb()?;
    let out = run_stdout(
        cargo()
            .current_dir(root())
            .args(["deb", "-p", "steward", "--locked", "--profile", profile])
            .arg("--output")
            .arg(target_dir().join("debian/")),
        "cargo deb",
    )?;
    deb_path(&out)
}

/// The same package again (no build) as Debian revision `revision`, to
/// upgrade to.
fn rebuild_as(profile: &str, revision: &str) -> Result<PathBuf> {
    let out = run_stdout(
        cargo()
            .current_dir(root())
            .args(["deb", "-p", "steward", "--no-build", "--fast"])
            .args(["--profile", profile, "--deb-revision", revision])
            .arg("--output")
            .arg(target_dir().join("debian/")),
        "cargo deb",
    )?;
    deb_path(&out)
}

/// cargo-deb prints the path of the package it wrote last.
fn deb_path(stdout: &str) -> Result<PathBuf> {
    stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .with_context(|| format!("cargo deb named no .deb: {stdout:?}"))
}

fn ensure_cargo_deb() -> Result<()> {
    let installed = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["deb", "--version"])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    if installed
        .as_deref()
        .is_some_and(|v| v.split_whitespace().any(|w| w == CARGO_DEB_VERSION))
    {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-deb {CARGO_DEB_VERSION} (once; takes a few minutes)");
    // Not cargo(): the install builds in a directory of its own.
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())).args([
            "install",
            "cargo-deb",
            "--locked",
            "--version",
            CARGO_DEB_VERSION,
        ]),
    )
}

const UNIT: &str = "steward.service";
const WANTS: &str = "/etc/systemd/system/multi-user.target.wants/steward.service";
const CONFFILES: [&str; 2] = ["/etc/steward/config.yaml", "/etc/steward/steward.env"];

/// What a purge must leave no trace of, besides the package's own files.
const STATE: [&str; 4] = [
    "/var/lib/steward",
    "/etc/steward",
    WANTS,
    // Where the unit is masked between removal and purge.
    "/etc/systemd/system/steward.service",
];

/// Builds the package from the dev profile, checks its maintainer scripts'
/// systemd calls, then installs, upgrades, removes and purges it on this
/// host. Skipped (and said) where it cannot run, would start Steward or
/// would touch a Steward that is not its own: without root or dpkg, under
/// a running systemd, or where steward is already installed or
/// /etc/steward or /var/lib/steward exist.
pub fn check() -> Result<()> {
    if let Some(why) = cannot_check() {
        // Where CI runs it, the check is part of what must pass.
        ensure!(
            std::env::var_os("CI").is_none(),
            "package check cannot run under CI: {why}"
        );
        eprintln!("xtask: package check skipped: {why}");
        return Ok(());
    }
    // Kept aside: cargo-deb may replace what it wrote into its output
    // directory when it writes the upgrade there (seen in CI: the -1
    // package was gone once the -2 one was written).
    let built = build("dev")?;
    let deb = target_dir().join("debian/check/steward-first.deb");
    if let Some(dir) = deb.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::copy(&built, &deb).with_context(|| format!("keeping {} aside", built.display()))?;
    let upgrade = rebuild_as("dev", "2")?;
    systemd_calls(&deb)?;
    let user_before = user_exists("steward");
    let installed = Installed;
    install_upgrade_remove(&deb, &upgrade)?;
    ensure!(
        user_exists("steward") == user_before,
        "the package added or removed a steward user"
    );
    dpkg(&["--purge", "steward"])?;
    std::mem::forget(installed);
    let status = Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", "steward"])
        .output()?;
    let status = String::from_utf8_lossy(&status.stdout);
    ensure!(
        status.is_empty() || status == "not-installed",
        "dpkg still knows steward after the purge: {status:?}"
    );
    let left: Vec<&str> = STATE
        .into_iter()
        .chain(["/usr/bin/steward"])
        .filter(|p| Path::new(p).symlink_metadata().is_ok())
        .collect();
    ensure!(left.is_empty(), "left after the purge: {left:?}");
    let helper_state = helper_state_naming_unit()?;
    ensure!(
        helper_state.is_empty(),
        "deb-systemd-helper still records {UNIT} after the purge: {helper_state:?}"
    );
    eprintln!(
        "xtask: package check passed ({}: install, upgrade, remove, purge)",
        deb.display()
    );
    Ok(())
}

fn cannot_check() -> Option<String> {
    let as_root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    if !as_root {
        return Some("not root (dpkg -i needs it)".into());
    }
    if Path::new("/run/systemd/system").exists() {
        return Some("systemd runs here: installing would start Steward".into());
    }
    for tool in ["dpkg", "dpkg-query", "dpkg-deb", "unshare"] {
        if crate::which(tool).is_none() {
            return Some(format!("no {tool} here"));
        }
    }
    let status = Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", "steward"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let status = String::from_utf8_lossy(&status.stdout);
    if !status.is_empty() && status != "not-installed" {
        return Some(format!(
            "a steward package is on this host ({status}); the check would remove it"
        ));
    }
    STATE
        .into_iter()
        .find(|p| Path::new(p).symlink_metadata().is_ok())
        .map(|p| format!("{p} exists; the check's purge would remove it"))
}

/// Purges the package when the check stops half way.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        eprintln!("xtask: package check failed; purging steward");
        let _ = dpkg(&["--purge", "steward"]);
    }
}

fn dpkg(args: &[&str]) -> Result<()> {
    run(Command::new("dpkg")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null()))
}

fn install_upgrade_remove(deb: &Path, upgrade: &Path) -> Result<()> {
    dpkg(&["-i", &deb.to_string_lossy()])?;
    let version = run_stdout(
        Command::new("/usr/bin/steward").arg("--version"),
        "steward --version",
    )?;
    ensure!(
        version.starts_with(&format!("steward {}", env!("CARGO_PKG_VERSION"))),
        "steward --version said {version:?}"
    );
    // The packaged binary has no dev control plane.
    let dev = Command::new("/usr/bin/steward")
        .args(["devserver", "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    ensure!(
        !dev.success(),
        "the packaged steward answers `devserver --help`"
    );
    let conffiles = run_stdout(
        Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "steward"]),
        "dpkg-query",
    )?;
    for file in CONFFILES {
        ensure!(
            conffiles
                .lines()
                .any(|l| l.split_whitespace().next() == Some(file)),
            "{file} is not a conffile: {conffiles:?}"
        );
    }
    let env_mode = std::fs::metadata(CONFFILES[1])?.permissions().mode() & 0o777;
    ensure!(env_mode == 0o600, "{} has mode {env_mode:o}", CONFFILES[1]);
    let data = std::fs::metadata("/var/lib/steward").context("/var/lib/steward")?;
    ensure!(
        data.is_dir() && data.uid() == 0 && data.permissions().mode() & 0o777 == 0o711,
        "/var/lib/steward: uid {}, mode {:o}",
        data.uid(),
        data.permissions().mode() & 0o777
    );
    ensure!(
        Path::new(WANTS).symlink_metadata().is_ok(),
        "{UNIT} was not enabled ({WANTS} missing)"
    );
    ensure!(
        no_steward_running()?,
        "installing started a steward with no systemd running"
    );

    // An operator's change to a conffile and Steward's state outlive the
    // upgrade and the removal; a purge takes both.
    let edited = format!(
        "{}# changed by the package check\n",
        std::fs::read_to_string(CONFFILES[0])?
    );
    std::fs::write(CONFFILES[0], &edited)?;
    std::fs::create_dir_all("/var/lib/steward/data")?;
    std::fs::write("/var/lib/steward/data/executor_id", "steward-package-check")?;
    dpkg(&["-i", &upgrade.to_string_lossy()])?;
    let version = run_stdout(
        Command::new("dpkg-query").args(["-W", "-f=${Version}", "steward"]),
        "dpkg-query",
    )?;
    ensure!(version.ends_with("-2"), "upgraded to {version:?}");
    ensure!(
        std::fs::read_to_string(CONFFILES[0])? == edited,
        "the upgrade replaced the edited {}",
        CONFFILES[0]
    );
    dpkg(&["--remove", "steward"])?;
    ensure!(
        !Path::new("/usr/bin/steward").exists(),
        "/usr/bin/steward outlived the removal"
    );
    ensure!(
        std::fs::read_to_string(CONFFILES[0])? == edited
            && Path::new("/var/lib/steward/data/executor_id").exists(),
        "the removal took the conffiles or the state directory (only a purge may)"
    );
    Ok(())
}

/// Whether no process runs /usr/bin/steward (or ran it, now deleted).
fn no_steward_running() -> Result<bool> {
    for entry in std::fs::read_dir("/proc")?.flatten() {
        if let Ok(exe) = std::fs::read_link(entry.path().join("exe"))
            && exe.to_string_lossy().starts_with("/usr/bin/steward")
        {
            return Ok(false);
        }
    }
    Ok(true)
}

fn user_exists(name: &str) -> bool {
    Command::new("getent")
        .args(["passwd", name])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// deb-systemd-helper's state files that still name the unit.
fn helper_state_naming_unit() -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut dirs = vec![PathBuf::from("/var/lib/systemd")];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with("deb-systemd-helper") && dir == Path::new("/var/lib/systemd") {
                continue;
            }
            if entry.file_type()?.is_dir() {
                dirs.push(path);
            } else if name.contains(UNIT) {
                found.push(path);
            }
        }
    }
    Ok(found)
}

/// The maintainer scripts against stand-ins for systemctl and the
/// deb-systemd helpers, in a mount namespace of their own where
/// /run/systemd/system exists (systemd "running") and /var/lib is empty:
/// enabled but not started on a first install (it needs its server
/// configured first: a `Type=notify` start would hold dpkg until Steward
/// registers), restarted after an upgrade if it runs (the new binary then
/// adopts the workers) and not stopped before it, stopped on removal, and
/// what it left running in the unit's cgroup killed (a real cgroup here,
/// with a real process).
fn systemd_calls(deb: &Path) -> Result<()> {
    let dir = target_dir().join("debian/scripts-check");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("bin"))?;
    let control = dir.join("control");
    run(Command::new("dpkg-deb").arg("-e").arg(deb).arg(&control))?;
    let log = dir.join("calls");
    let left = LeftInUnit::start()?;
    for tool in ["systemctl", "deb-systemd-invoke", "deb-systemd-helper"] {
        let path = dir.join("bin").join(tool);
        // `systemctl show` names the stand-in unit cgroup.
        let show = match (tool, &left) {
            ("systemctl", Some(l)) => {
                format!("if [ \"$1\" = show ]; then echo '{}'; fi\n", l.cgroup_path)
            }
            _ => String::new(),
        };
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\necho \"{tool} $*\" >> '{}'\n{show}",
                log.display()
            ),
        )?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    }
    let path = format!(
        "{}:/usr/sbin:/usr/bin:/sbin:/bin",
        dir.join("bin").display()
    );
    let calls = |script: &str, args: &[&str]| -> Result<String> {
        let _ = std::fs::remove_file(&log);
        run(Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-ec"])
            .arg(
                "mount -t tmpfs tmpfs /run; mkdir -p /run/systemd/system; \
                 mount -t tmpfs tmpfs /var/lib; exec sh \"$@\"",
            )
            .arg("sh")
            .arg(control.join(script))
            .args(args)
            .env("PATH", &path))?;
        Ok(std::fs::read_to_string(&log).unwrap_or_default())
    };
    let version = format!("{}-1", env!("CARGO_PKG_VERSION"));
    let install = calls("postinst", &["configure"])?;
    ensure!(
        install.contains("deb-systemd-helper enable steward.service"),
        "postinst configure (install) did not enable Steward:\n{install}"
    );
    ensure!(
        !install.contains("start steward.service"),
        "postinst configure (install) starts Steward before its server is configured:\n{install}"
    );
    let prerm_upgrade = calls("prerm", &["upgrade", &version])?;
    ensure!(
        !prerm_upgrade.contains("stop"),
        "prerm stops Steward before an upgrade:\n{prerm_upgrade}"
    );
    let upgrade = calls("postinst", &["configure", &version])?;
    ensure!(
        upgrade.contains("deb-systemd-invoke try-restart steward.service"),
        "postinst configure (upgrade) did not restart a running Steward:\n{upgrade}"
    );
    let remove = calls("prerm", &["remove"])?;
    ensure!(
        remove.contains("deb-systemd-invoke stop steward.service"),
        "prerm remove did not stop Steward:\n{remove}"
    );
    if let Some(l) = left {
        l.gone_after_removal()?;
    } else {
        eprintln!(
            "xtask: no writable cgroup hierarchy of systemd's here: the removal's kill of what Steward left is not checked"
        );
    }
    Ok(())
}

/// A process in a cgroup of its own, standing in for a worker that a
/// stopped Steward left running in its unit's cgroup (adoption), in the
/// hierarchy systemd keeps units in: the unified one (v2, or hybrid) or
/// its named v1 one; `None` without one that is writable.
struct LeftInUnit {
    /// The cgroup as `systemctl show -p ControlGroup` names it.
    cgroup_path: String,
    dir: PathBuf,
    child: std::process::Child,
}

impl LeftInUnit {
    fn start() -> Result<Option<LeftInUnit>> {
        let roots = [
            ("/sys/fs/cgroup", "cgroup.controllers"),
            ("/sys/fs/cgroup/unified", "cgroup.controllers"),
            ("/sys/fs/cgroup/systemd", "cgroup.procs"),
        ];
        let Some(root) = roots
            .iter()
            .map(|(r, marker)| (Path::new(r), marker))
            .find(|(r, marker)| r.join(marker).exists())
            .map(|(r, _)| r)
        else {
            return Ok(None);
        };
        let cgroup_path = format!("/steward-pkgcheck-{}", std::process::id());
        let dir = root.join(&cgroup_path[1..]);
        if std::fs::create_dir(&dir).is_err() {
            return Ok(None);
        }
        let child = Command::new("sleep").arg("600").spawn()?;
        let left = LeftInUnit {
            cgroup_path,
            dir,
            child,
        };
        std::fs::write(left.dir.join("cgroup.procs"), left.child.id().to_string())?;
        Ok(Some(left))
    }

    /// Whether the removal killed it (waited for, bounded).
    fn gone_after_removal(mut self) -> Result<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.child.try_wait()?.is_none() {
            ensure!(
                std::time::Instant::now() < deadline,
                "prerm remove left a process in the unit's cgroup running"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for LeftInUnit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deb_path_is_the_last_deb_cargo_deb_names() {
        let out = "warning: something\n/x/target/debian/steward_0.1.0-1_amd64.deb\n";
        assert_eq!(
            deb_path(out).expect("named"),
            Path::new("/x/target/debian/steward_0.1.0-1_amd64.deb")
        );
        assert!(deb_path("no package\n").is_err());
    }
}
