//! The text formats of the files cgroups are found and read through, as
//! pure functions over their contents (tested over captured files).

use std::path::PathBuf;

/// One line of `/proc/self/mountinfo` that mounts a cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    /// The part of the hierarchy mounted (not `/` inside some containers).
    pub root: String,
    pub mount_point: PathBuf,
    /// `cgroup2` or `cgroup`.
    pub fstype: String,
    /// v1: the controllers this hierarchy carries (from the super options).
    pub controllers: Vec<String>,
    /// Every super option (`name=systemd` of a named v1 hierarchy too).
    pub options: Vec<String>,
}

/// The cgroup mounts listed in `mountinfo`.
pub fn parse_mountinfo(mountinfo: &str) -> Vec<CgroupMount> {
    mountinfo.lines().filter_map(parse_mount_line).collect()
}

fn parse_mount_line(line: &str) -> Option<CgroupMount> {
    let (before, after) = line.split_once(" - ")?;
    let fields: Vec<&str> = before.split(' ').collect();
    let mut tail = after.split(' ');
    let fstype = tail.next()?;
    if fstype != "cgroup" && fstype != "cgroup2" {
        return None;
    }
    let _source = tail.next()?;
    let options = tail.next().unwrap_or("");
    let all: Vec<String> = options.split(',').map(str::to_string).collect();
    let controllers = if fstype == "cgroup" {
        options
            .split(',')
            .filter(|o| !o.contains('=') && !matches!(*o, "rw" | "ro"))
            .map(str::to_string)
            .collect()
    } else {
        Vec::new()
    };
    Some(CgroupMount {
        root: unescape(fields.get(3)?),
        mount_point: PathBuf::from(unescape(fields.get(4)?)),
        fstype: fstype.to_string(),
        controllers,
        options: all,
    })
}

/// Every mount point listed in `mountinfo` (of any file system).
pub fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .collect()
}

/// Undoes the kernel's octal escapes (`\040` for a space) in mountinfo paths.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A process's cgroup path in a hierarchy, from `/proc/<pid>/cgroup`:
/// `controller` is a v1 controller name, or `None` for the v2 (`0::`) line.
pub fn own_path(proc_cgroup: &str, controller: Option<&str>) -> Option<String> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (id, list, path) = (parts.next()?, parts.next()?, parts.next()?);
        let hit = match controller {
            None => id == "0" && list.is_empty(),
            Some(c) => list.split(',').any(|l| l == c),
        };
        hit.then(|| path.to_string())
    })
}

/// A `key value` line's value from a flat-keyed file (`memory.events`,
/// `memory.oom_control`, `cpu.stat`).
pub fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut parts = l.split_whitespace();
        (parts.next()? == key).then_some(())?;
        parts.next()?.parse().ok()
    })
}

/// A file holding one number (`memory.current`, `cpuacct.usage`); `max` reads as `None`.
pub fn single(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// The pids listed in `cgroup.procs`.
pub fn pids(text: &str) -> Vec<i32> {
    text.lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter(|p| *p > 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured on a hybrid host (cgroup v1 controllers, an empty v2 mount).
    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    /// Captured on a systemd host with the unified hierarchy only.
    const UNIFIED: &str = "\
24 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    #[test]
    fn finds_cgroup_mounts_of_both_kinds() {
        let m = parse_mountinfo(HYBRID);
        assert_eq!(m.len(), 6);
        assert_eq!(m[0].controllers, vec!["cpu"]);
        assert_eq!(m[2].mount_point, PathBuf::from("/sys/fs/cgroup/memory"));
        assert!(
            m[4].controllers.is_empty(),
            "name=systemd carries no controller"
        );
        assert_eq!(m[5].fstype, "cgroup2");
        let u = parse_mountinfo(UNIFIED);
        assert_eq!(u.len(), 1);
        assert_eq!((u[0].root.as_str(), u[0].fstype.as_str()), ("/", "cgroup2"));
    }

    #[test]
    fn co_mounted_controllers_and_escaped_paths() {
        let line = "40 31 0:37 /docker/abc /sys/fs/cgroup/cpu\\054cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n";
        let m = parse_mountinfo(line);
        assert_eq!(m[0].controllers, vec!["cpu", "cpuacct"]);
        assert_eq!(
            m[0].mount_point,
            PathBuf::from("/sys/fs/cgroup/cpu,cpuacct")
        );
        assert_eq!(m[0].root, "/docker/abc");
        assert!(parse_mountinfo("garbage\n\n - \n").is_empty());
    }

    #[test]
    fn own_cgroup_per_hierarchy() {
        let text =
            "9:name=systemd:/\n4:memory:/process_api/5471\n2:cpu,cpuacct:/a\n0::/user.slice/x\n";
        assert_eq!(
            own_path(text, Some("memory")).as_deref(),
            Some("/process_api/5471")
        );
        assert_eq!(own_path(text, Some("cpuacct")).as_deref(), Some("/a"));
        assert_eq!(own_path(text, Some("pids")), None);
        assert_eq!(own_path(text, None).as_deref(), Some("/user.slice/x"));
    }

    #[test]
    fn counters_from_captured_files() {
        // cgroup v2 memory.events after one OOM kill.
        let events = "low 0\nhigh 0\nmax 37\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(keyed(events, "oom_kill"), Some(1));
        assert_eq!(keyed(events, "oom"), Some(1));
        // cgroup v1 memory.oom_control.
        let control = "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n";
        assert_eq!(keyed(control, "oom_kill"), Some(2));
        // cgroup v2 cpu.stat.
        let stat = "usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\nnr_periods 20\nnr_throttled 9\nthrottled_usec 400000\n";
        assert_eq!(keyed(stat, "usage_usec"), Some(1_500_000));
        assert_eq!(keyed(stat, "nope"), None);
        assert_eq!(single("134217728\n"), Some(134_217_728));
        assert_eq!(single("max\n"), None);
        assert_eq!(pids("12\n0\n-3\nx\n34\n"), vec![12, 34]);
    }
}
