//! What of the host goes into a worker's container: the runtime
//! directories (`/usr`, `/lib`, … bound read-only, or recreated as links
//! where the host has merged `/usr`), the Python environment a program
//! needs (a venv and the interpreter installation it points at), the
//! device nodes of the worker's GPUs, and every cgroup hierarchy the
//! runtime puts a container in (so that Steward can remove its parents).
//!
//! Must not know about: the runtime's command line, workers' lifecycle.

use std::fs;
use std::path::{Path, PathBuf};

use super::bundle::DeviceNode;

/// The host directories every container gets read-only: programs,
/// libraries and configuration (`/etc`: name resolution, CA certificates,
/// time zones). Missing ones are skipped.
pub const RUNTIME_DIRS: &[&str] = &["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc"];

/// Control device nodes every GPU worker also needs, where the host has them.
const NVIDIA_CONTROL_NODES: &[&str] = &[
    "nvidiactl",
    "nvidia-uvm",
    "nvidia-uvm-tools",
    "nvidia-modeset",
];

/// Binds and links for the runtime directories of the host whose root is
/// `root` (`/`, or a fixture): a directory is bound, a symbolic link (as
/// `/bin -> usr/bin`) is recreated as the same link.
pub fn runtime_dirs(root: &Path) -> (Vec<PathBuf>, Vec<(PathBuf, PathBuf)>) {
    let mut binds = Vec::new();
    let mut links = Vec::new();
    for d in RUNTIME_DIRS {
        let at = root.join(d.trim_start_matches('/'));
        match fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                if let Ok(target) = fs::read_link(&at) {
                    links.push((PathBuf::from(d), target));
                }
            }
            Ok(m) if m.is_dir() => binds.push(PathBuf::from(d)),
            _ => {}
        }
    }
    (binds, links)
}

/// Finds `program` on `path` (a `PATH` value) unless it names a file.
pub fn resolve_program(program: &Path, path: Option<&str>) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return fs::canonicalize(program).ok();
    }
    path?
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
        .and_then(|p| fs::canonicalize(&p).ok().or(Some(p)))
}

/// Whether `p` is already inside one of `binds`.
fn covered(p: &Path, binds: &[PathBuf]) -> bool {
    binds.iter().any(|b| p.starts_with(b))
}

/// The installation prefix of an interpreter (`/opt/py/bin/python3` ->
/// `/opt/py`), following links.
fn prefix_of(interpreter: &Path) -> Option<PathBuf> {
    let real = fs::canonicalize(interpreter).ok()?;
    Some(real.parent()?.parent()?.to_path_buf())
}

/// The interpreter of a script (`#!/path/python3 …`), if it has one.
fn shebang(program: &Path) -> Option<PathBuf> {
    use std::io::Read;
    let mut head = [0u8; 256];
    let n = fs::File::open(program).ok()?.read(&mut head).ok()?;
    let line = head.get(..n)?.strip_prefix(b"#!")?;
    let line = String::from_utf8_lossy(line);
    let first = line.lines().next()?.split_whitespace().next()?.to_string();
    Some(PathBuf::from(first))
}

/// What a program needs besides the runtime directories (already in
/// `base`): its own file (or its venv), the venv's interpreter
/// installation (`home` in `pyvenv.cfg`), a script's interpreter.
pub fn program_binds(program: &Path, base: &[PathBuf]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    let add = |p: PathBuf, out: &mut Vec<PathBuf>| {
        if !covered(&p, base) && !covered(&p, out) {
            out.retain(|o| !o.starts_with(&p));
            out.push(p);
        }
    };
    // A program in `<venv>/bin` brings the whole venv.
    let venv = program
        .parent()
        .and_then(Path::parent)
        .filter(|v| v.join("pyvenv.cfg").is_file());
    match venv {
        Some(v) => {
            add(v.to_path_buf(), &mut out);
            let home = fs::read_to_string(v.join("pyvenv.cfg"))
                .ok()
                .and_then(|cfg| {
                    cfg.lines()
                        .filter_map(|l| l.split_once('='))
                        .find(|(k, _)| k.trim() == "home")
                        .map(|(_, h)| PathBuf::from(h.trim()))
                });
            // `home` is the interpreter's bin directory; the venv's own
            // `python` links there too.
            let interpreters = [
                home.map(|h| h.join("python3")),
                Some(v.join("bin/python3")),
                Some(v.join("bin/python")),
            ];
            for i in interpreters.into_iter().flatten() {
                if let Some(p) = prefix_of(&i) {
                    add(p, &mut out);
                }
            }
        }
        None => add(program.to_path_buf(), &mut out),
    }
    if let Some(interp) = shebang(program)
        && let Some(p) = prefix_of(&interp)
    {
        add(p, &mut out);
    }
    out
}

/// One GPU as the NVIDIA driver describes it under
/// `/proc/driver/nvidia/gpus/<bus id>/information`.
fn gpu_information(text: &str) -> Option<(String, u32)> {
    let field = |name: &str| {
        text.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim() == name)
            .map(|(_, v)| v.trim().to_string())
    };
    Some((field("GPU UUID")?, field("Device Minor")?.parse().ok()?))
}

/// The device nodes of the GPUs `uuids` (and the control nodes they all
/// need), looked up under `proc` (`/proc`) and `dev` (`/dev`); an unknown
/// UUID is an error naming it.
pub fn gpu_devices(
    uuids: &[String],
    proc: &Path,
    dev: &Path,
) -> Result<Vec<DeviceNode>, DeviceError> {
    if uuids.is_empty() {
        return Ok(Vec::new());
    }
    let gpus_dir = proc.join("driver/nvidia/gpus");
    let known: Vec<(String, u32)> = fs::read_dir(&gpus_dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| fs::read_to_string(e.path().join("information")).ok())
                .filter_map(|t| gpu_information(&t))
                .collect()
        })
        .unwrap_or_default();
    let mut nodes = Vec::new();
    for uuid in uuids {
        let minor = known
            .iter()
            .find(|(u, _)| u.eq_ignore_ascii_case(uuid))
            .map(|(_, m)| *m)
            .ok_or_else(|| DeviceError::UnknownGpu {
                uuid: uuid.clone(),
                gpus_dir: gpus_dir.clone(),
            })?;
        nodes.push(device_node(&dev.join(format!("nvidia{minor}")))?);
    }
    for name in NVIDIA_CONTROL_NODES {
        let p = dev.join(name);
        if p.exists() {
            nodes.push(device_node(&p)?);
        }
    }
    Ok(nodes)
}

/// Why a GPU's device nodes cannot go into a container.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("GPU {uuid}: no {gpus_dir}/*/information names it, so its device node is unknown")]
    UnknownGpu { uuid: String, gpus_dir: PathBuf },
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{0} is not a character device")]
    NotACharDevice(PathBuf),
}

/// A character device's node: its path and numbers.
fn device_node(path: &Path) -> Result<DeviceNode, DeviceError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = fs::metadata(path).map_err(|error| DeviceError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    if !m.file_type().is_char_device() {
        return Err(DeviceError::NotACharDevice(path.to_path_buf()));
    }
    let rdev = m.rdev();
    Ok(DeviceNode {
        path: path.to_path_buf(),
        major: i64::from(libc::major(rdev)),
        minor: i64::from(libc::minor(rdev)),
    })
}

/// Every cgroup hierarchy Steward's process is in, as (mount point, its
/// own cgroup's directory): v1 hierarchies named or with controllers, and
/// the v2 one. The runtime puts each container in all of them.
pub fn own_cgroup_dirs(mountinfo: &str, self_cgroup: &str) -> Vec<PathBuf> {
    let mounts = crate::cgroup::files::parse_mountinfo(mountinfo);
    let mut out = Vec::new();
    for line in self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(list), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let names: Vec<&str> = list.split(',').filter(|s| !s.is_empty()).collect();
        let m = mounts.iter().find(|m| {
            let v2 = m.fstype == "cgroup2";
            if names.is_empty() {
                v2
            } else {
                !v2 && names.iter().all(|n| m.options.iter().any(|o| o == n))
            }
        });
        let Some(dir) = m.and_then(|m| crate::cgroup::dir_in_mount(m, path)) else {
            continue;
        };
        if !out.contains(&dir) {
            out.push(dir);
        }
    }
    out
}

/// The mount point of the hierarchy holding `dir` (the longest cgroup
/// mount point that is a prefix of it).
pub fn cgroup_mount_of(mountinfo: &str, dir: &Path) -> Option<PathBuf> {
    crate::cgroup::files::parse_mountinfo(mountinfo)
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| dir.starts_with(p))
        .max_by_key(|p| p.as_os_str().len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_usr_hosts_get_links_and_other_hosts_binds() {
        let root = tempfile::tempdir().expect("tmp");
        for d in ["usr/bin", "usr/lib", "etc", "lib64"] {
            fs::create_dir_all(root.path().join(d)).expect("mkdir");
        }
        std::os::unix::fs::symlink("usr/bin", root.path().join("bin")).expect("link");
        std::os::unix::fs::symlink("usr/lib", root.path().join("lib")).expect("link");
        let (binds, links) = runtime_dirs(root.path());
        assert_eq!(
            binds,
            ["/usr", "/lib64", "/etc"].map(PathBuf::from).to_vec()
        );
        assert_eq!(
            links,
            vec![
                (PathBuf::from("/bin"), PathBuf::from("usr/bin")),
                (PathBuf::from("/lib"), PathBuf::from("usr/lib")),
            ]
        );
    }

    #[test]
    fn a_venv_brings_itself_and_its_interpreter_installation() {
        let t = tempfile::tempdir().expect("tmp");
        let install = t.path().join("opt/python3.11");
        fs::create_dir_all(install.join("bin")).expect("mkdir");
        fs::write(install.join("bin/python3.11"), "").expect("python");
        std::os::unix::fs::symlink("python3.11", install.join("bin/python3")).expect("link");
        let venv = t.path().join("srv/venv");
        fs::create_dir_all(venv.join("bin")).expect("mkdir");
        fs::write(
            venv.join("pyvenv.cfg"),
            format!(
                "home = {}\nversion = 3.11.7\n",
                install.join("bin").display()
            ),
        )
        .expect("cfg");
        std::os::unix::fs::symlink(install.join("bin/python3"), venv.join("bin/python3"))
            .expect("link");
        let fe = venv.join("bin/function-executor");
        fs::write(&fe, format!("#!{}/bin/python3\n", venv.display())).expect("script");
        let real = |p: &Path| fs::canonicalize(p).expect("real");
        let binds = program_binds(&real(&fe), &[]);
        assert_eq!(binds, vec![real(&venv), real(&install)]);
        // Already under a runtime directory: nothing more.
        assert!(program_binds(&real(&fe), &[real(t.path())]).is_empty());
        // A binary outside any venv brings only itself.
        let bin = t.path().join("bin-dir/fake-worker");
        fs::create_dir_all(bin.parent().expect("parent")).expect("mkdir");
        fs::write(&bin, [0x7f, b'E', b'L', b'F']).expect("elf");
        assert_eq!(program_binds(&real(&bin), &[]), vec![real(&bin)]);
    }

    #[test]
    fn programs_are_found_on_path() {
        let t = tempfile::tempdir().expect("tmp");
        fs::write(t.path().join("function-executor"), "").expect("write");
        let path = format!("/nonexistent:{}", t.path().display());
        let found = resolve_program(Path::new("function-executor"), Some(&path)).expect("found");
        assert!(found.ends_with("function-executor"));
        assert_eq!(resolve_program(Path::new("nope"), Some(&path)), None);
    }

    #[test]
    fn gpu_uuids_map_to_their_device_nodes_and_the_control_nodes() {
        let t = tempfile::tempdir().expect("tmp");
        let proc = t.path().join("proc");
        let dev = t.path().join("dev");
        for (bus, uuid, minor) in [
            ("0000:00:1e.0", "GPU-aaaa", 0),
            ("0000:00:1f.0", "GPU-bbbb", 3),
        ] {
            let d = proc.join("driver/nvidia/gpus").join(bus);
            fs::create_dir_all(&d).expect("mkdir");
            fs::write(
                d.join("information"),
                format!("Model: \t\t Tesla T4\nIRQ:   \t\t 35\nGPU UUID: \t {uuid}\nDevice Minor: \t {minor}\n"),
            )
            .expect("information");
        }
        // Stand-ins for the device nodes: links to real character devices.
        fs::create_dir_all(&dev).expect("mkdir");
        std::os::unix::fs::symlink("/dev/null", dev.join("nvidia3")).expect("link");
        std::os::unix::fs::symlink("/dev/zero", dev.join("nvidiactl")).expect("link");
        let nodes = gpu_devices(&["GPU-bbbb".into()], &proc, &dev).expect("nodes");
        assert_eq!(
            nodes,
            vec![
                DeviceNode {
                    path: dev.join("nvidia3"),
                    major: 1,
                    minor: 3
                },
                DeviceNode {
                    path: dev.join("nvidiactl"),
                    major: 1,
                    minor: 5
                },
            ]
        );
        let unknown = gpu_devices(&["GPU-cccc".into()], &proc, &dev).expect_err("unknown");
        assert!(unknown.to_string().contains("GPU-cccc"), "{unknown}");
        // GPU-aaaa's node is missing: said, not skipped.
        assert!(gpu_devices(&["GPU-aaaa".into()], &proc, &dev).is_err());
        assert!(gpu_devices(&[], &proc, &dev).expect("none").is_empty());
    }

    #[test]
    fn every_hierarchy_of_a_hybrid_host_is_found() {
        let mountinfo = "\
30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
32 30 0:28 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
33 30 0:29 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
34 30 0:30 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
35 30 0:31 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        let self_cgroup = "\
5:name=systemd:/
4:devices:/
3:memory:/process_api/e2
1:cpu:/
0::/
";
        assert_eq!(
            own_cgroup_dirs(mountinfo, self_cgroup),
            [
                "/sys/fs/cgroup/systemd",
                "/sys/fs/cgroup/devices",
                "/sys/fs/cgroup/memory/process_api/e2",
                "/sys/fs/cgroup/cpu",
                "/sys/fs/cgroup/unified",
            ]
            .map(PathBuf::from)
            .to_vec()
        );
        assert_eq!(
            cgroup_mount_of(
                mountinfo,
                Path::new("/sys/fs/cgroup/memory/process_api/e2/steward")
            ),
            Some(PathBuf::from("/sys/fs/cgroup/memory"))
        );
    }
}
