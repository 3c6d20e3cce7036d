//! Per-box cgroups on cgroup v1 (one directory per controller hierarchy, as on this project's
//! hosts) or v2 (one unified directory). Plain file writes: the files are simple and a library
//! would not save code here.

use crate::{Limits, Result, RuntimeError, Usage};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const CPU_PERIOD_US: u64 = 100_000;
/// Device nodes a box may use (v1 devices controller): null, zero, full, random, urandom, tty,
/// ptmx and the box's own ptys.
const ALLOWED_DEVICES: &[&str] =
    &["c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm", "c 1:8 rwm", "c 1:9 rwm", "c 5:0 rwm", "c 5:2 rwm", "c 136:* rwm"];

#[derive(Debug, Clone)]
pub enum Layout {
    /// Controller name -> mount point of its v1 hierarchy.
    V1(Vec<(String, PathBuf)>),
    V2(PathBuf),
}

/// Where the box cgroups of this server live.
#[derive(Debug, Clone)]
pub struct Cgroups {
    layout: Layout,
    /// Directory name under each hierarchy root, e.g. `devboxd`.
    group: String,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RuntimeError {
    let what = what.into();
    move |e| RuntimeError::io(what, e)
}

fn write(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).map_err(io(format!("write {value:?} to {}", path.display())))
}

impl Cgroups {
    pub fn detect(group: &str) -> Result<Cgroups> {
        let mounts = fs::read_to_string("/proc/self/mounts").map_err(io("read /proc/self/mounts"))?;
        let mut v1 = vec![];
        let mut v2 = None;
        for line in mounts.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 {
                continue;
            }
            match f[2] {
                "cgroup" => {
                    for opt in f[3].split(',') {
                        if ["memory", "cpu", "cpuacct", "pids", "freezer", "devices"].contains(&opt) {
                            v1.push((opt.to_string(), PathBuf::from(f[1])));
                        }
                    }
                }
                "cgroup2" if v2.is_none() => v2 = Some(PathBuf::from(f[1])),
                _ => {}
            }
        }
        let has = |c: &str| v1.iter().any(|(n, _)| n == c);
        let layout = if has("memory") && has("pids") && has("cpu") && has("freezer") {
            Layout::V1(v1)
        } else if let Some(root) = v2 {
            Layout::V2(root)
        } else {
            return Err(RuntimeError::Unsupported(
                "no usable cgroup hierarchy: need cgroup v1 memory, cpu, pids and freezer, or cgroup v2".into(),
            ));
        };
        Ok(Cgroups { layout, group: group.to_string() })
    }

    pub fn describe(&self) -> String {
        match &self.layout {
            Layout::V1(_) => "cgroup v1".into(),
            Layout::V2(_) => "cgroup v2".into(),
        }
    }

    fn v1_dir(&self, ctrl: &str, id: &str) -> Option<PathBuf> {
        match &self.layout {
            Layout::V1(m) => m.iter().find(|(n, _)| n == ctrl).map(|(_, p)| p.join(&self.group).join(id)),
            Layout::V2(_) => None,
        }
    }

    /// Every directory of this box (one per v1 hierarchy, deduplicated; or the v2 one).
    fn dirs(&self, id: &str) -> Vec<PathBuf> {
        match &self.layout {
            Layout::V1(m) => {
                let mut v: Vec<PathBuf> = m.iter().map(|(_, p)| p.join(&self.group).join(id)).collect();
                v.sort();
                v.dedup();
                v
            }
            Layout::V2(root) => vec![root.join(&self.group).join(id)],
        }
    }

    /// Create the box's cgroups with its limits; returns the `cgroup.procs` files to join.
    pub fn create(&self, id: &str, limits: &Limits) -> Result<Vec<String>> {
        match &self.layout {
            Layout::V1(_) => {
                for d in self.dirs(id) {
                    fs::create_dir_all(&d).map_err(io(format!("create cgroup {}", d.display())))?;
                }
                let mem = self.v1_dir("memory", id).expect("memory hierarchy");
                write(&mem.join("memory.limit_in_bytes"), &limits.memory_bytes.to_string())?;
                let memsw = mem.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write(&memsw, &limits.memory_bytes.to_string())?;
                }
                let cpu = self.v1_dir("cpu", id).expect("cpu hierarchy");
                write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                write(&cpu.join("cpu.cfs_quota_us"), &(limits.cpu_millis as u64 * CPU_PERIOD_US / 1000).to_string())?;
                let pids = self.v1_dir("pids", id).expect("pids hierarchy");
                write(&pids.join("pids.max"), &limits.pids.to_string())?;
                if let Some(dev) = self.v1_dir("devices", id) {
                    write(&dev.join("devices.deny"), "a")?;
                    for rule in ALLOWED_DEVICES {
                        write(&dev.join("devices.allow"), rule)?;
                    }
                }
            }
            Layout::V2(root) => {
                let parent = root.join(&self.group);
                fs::create_dir_all(&parent).map_err(io(format!("create cgroup {}", parent.display())))?;
                // Controllers must be enabled top-down; already-enabled ones are fine.
                let _ = fs::write(root.join("cgroup.subtree_control"), "+memory +pids +cpu");
                write(&parent.join("cgroup.subtree_control"), "+memory +pids +cpu")?;
                let d = parent.join(id);
                fs::create_dir_all(&d).map_err(io(format!("create cgroup {}", d.display())))?;
                write(&d.join("memory.max"), &limits.memory_bytes.to_string())?;
                let _ = fs::write(d.join("memory.swap.max"), "0");
                write(&d.join("pids.max"), &limits.pids.to_string())?;
                write(
                    &d.join("cpu.max"),
                    &format!("{} {CPU_PERIOD_US}", limits.cpu_millis as u64 * CPU_PERIOD_US / 1000),
                )?;
            }
        }
        Ok(self.dirs(id).iter().map(|d| d.join("cgroup.procs").display().to_string()).collect())
    }

    pub fn freeze(&self, id: &str, frozen: bool) -> Result<()> {
        match &self.layout {
            Layout::V1(_) => {
                let f = self.v1_dir("freezer", id).expect("freezer hierarchy").join("freezer.state");
                write(&f, if frozen { "FROZEN" } else { "THAWED" })?;
                // v1 freezing is asynchronous: wait until the state settles.
                let want = if frozen { "FROZEN" } else { "THAWED" };
                let start = Instant::now();
                while start.elapsed() < Duration::from_secs(10) {
                    if fs::read_to_string(&f).map(|s| s.trim() == want).unwrap_or(false) {
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
                Err(RuntimeError::Unsupported(format!("cgroup freezer did not reach {want}")))
            }
            Layout::V2(root) => {
                let d = root.join(&self.group).join(id);
                write(&d.join("cgroup.freeze"), if frozen { "1" } else { "0" })?;
                // Freezing is asynchronous: only "frozen 1" in cgroup.events means stopped.
                let want = if frozen { "frozen 1" } else { "frozen 0" };
                let start = Instant::now();
                while start.elapsed() < Duration::from_secs(10) {
                    if fs::read_to_string(d.join("cgroup.events")).is_ok_and(|s| s.lines().any(|l| l == want)) {
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
                Err(RuntimeError::Unsupported(format!("cgroup v2 freezer did not reach {want:?}")))
            }
        }
    }

    /// Pids (host view) still in the box's cgroup.
    pub fn procs(&self, id: &str) -> Vec<i32> {
        let d = match &self.layout {
            Layout::V1(_) => self.v1_dir("pids", id).expect("pids hierarchy"),
            Layout::V2(root) => root.join(&self.group).join(id),
        };
        fs::read_to_string(d.join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    pub fn exists(&self, id: &str) -> bool {
        self.dirs(id).first().map(|d| d.exists()).unwrap_or(false)
    }

    /// Kill whatever is left, then remove the directories.
    pub fn remove(&self, id: &str) -> Result<()> {
        if !self.exists(id) {
            return Ok(());
        }
        let _ = self.freeze(id, false);
        let start = Instant::now();
        loop {
            let pids = self.procs(id);
            if pids.is_empty() {
                break;
            }
            for p in pids {
                // SAFETY: kill(2); the pid is a member of this box's cgroup.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            if start.elapsed() > Duration::from_secs(10) {
                return Err(RuntimeError::Unsupported(format!("processes of {id} survive SIGKILL")));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        for d in self.dirs(id) {
            let start = Instant::now();
            while d.exists() {
                match fs::remove_dir(&d) {
                    Ok(()) => break,
                    // EBUSY while the kernel finishes tearing down exited tasks.
                    Err(_) if start.elapsed() < Duration::from_secs(5) => std::thread::sleep(Duration::from_millis(2)),
                    Err(e) => return Err(RuntimeError::io(format!("remove cgroup {}", d.display()), e)),
                }
            }
        }
        Ok(())
    }

    pub fn usage(&self, id: &str) -> Usage {
        let read_u64 = |p: PathBuf| fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<u64>().ok());
        match &self.layout {
            Layout::V1(_) => Usage {
                cpu_nanos: self.v1_dir("cpuacct", id).and_then(|d| read_u64(d.join("cpuacct.usage"))).unwrap_or(0),
                memory_bytes: self
                    .v1_dir("memory", id)
                    .and_then(|d| read_u64(d.join("memory.usage_in_bytes")))
                    .unwrap_or(0),
                pids: self.v1_dir("pids", id).and_then(|d| read_u64(d.join("pids.current"))).unwrap_or(0),
                oom_kills: self
                    .v1_dir("memory", id)
                    .and_then(|d| fs::read_to_string(d.join("memory.oom_control")).ok())
                    .and_then(|s| {
                        s.lines().find_map(|l| l.strip_prefix("oom_kill ").and_then(|v| v.trim().parse().ok()))
                    })
                    .unwrap_or(0),
            },
            Layout::V2(root) => {
                let d = root.join(&self.group).join(id);
                let stat = fs::read_to_string(d.join("cpu.stat")).unwrap_or_default();
                let usec = stat
                    .lines()
                    .find_map(|l| l.strip_prefix("usage_usec ").and_then(|v| v.trim().parse::<u64>().ok()))
                    .unwrap_or(0);
                let events = fs::read_to_string(d.join("memory.events")).unwrap_or_default();
                Usage {
                    cpu_nanos: usec * 1000,
                    memory_bytes: read_u64(d.join("memory.current")).unwrap_or(0),
                    pids: read_u64(d.join("pids.current")).unwrap_or(0),
                    oom_kills: events
                        .lines()
                        .find_map(|l| l.strip_prefix("oom_kill ").and_then(|v| v.trim().parse().ok()))
                        .unwrap_or(0),
                }
            }
        }
    }
}
