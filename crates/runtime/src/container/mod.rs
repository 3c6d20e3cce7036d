//! The container runtime: each box is a set of fresh namespaces over an overlayfs root, held in
//! cgroups, with `devbox-agent` as its init. The host side here prepares directories, cgroups
//! and the boot file; the agent's `container-init` does the in-namespace work in-process.

pub mod cgroup;
pub mod disk;

use crate::image::ImageStore;
use crate::{AgentClient, BoxSpec, Launched, Result, Runtime, RuntimeError, RuntimeState, Usage};
use cgroup::Cgroups;
use devbox_protocol::ContainerBoot;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest unix socket path the kernel accepts, minus the NUL.
const MAX_SOCKET_PATH: usize = 107;
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(15);

pub struct ContainerRuntime {
    boxes_dir: PathBuf,
    images: ImageStore,
    agent: PathBuf,
    cgroups: Cgroups,
    /// Per-box filesystems bounding disk use; None where loop devices are unavailable.
    disks: Option<disk::Disks>,
    disk_note: String,
}

/// Nanoseconds since the epoch, for unique temporary names.
pub(crate) fn nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

#[derive(serde::Serialize, serde::Deserialize)]
struct State {
    init_pid: i32,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RuntimeError {
    let what = what.into();
    move |e| RuntimeError::io(what, e)
}

/// Write the embedded agent next to the data, named by content so upgrades never overwrite
/// the executable of a running box.
fn install_agent(bin_dir: &Path) -> Result<PathBuf> {
    let bytes = devbox_agent_blob::AGENT;
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h = (h ^ *b as u64).wrapping_mul(0x100000001b3);
    }
    std::fs::create_dir_all(bin_dir).map_err(io(format!("create {}", bin_dir.display())))?;
    let path = bin_dir.join(format!("devbox-agent-{h:016x}"));
    if !path.exists() {
        let tmp = bin_dir.join(format!(".devbox-agent-{}", std::process::id()));
        std::fs::write(&tmp, bytes).map_err(io(format!("write {}", tmp.display())))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
            .map_err(io(format!("chmod {}", tmp.display())))?;
        std::fs::rename(&tmp, &path).map_err(io(format!("install {}", path.display())))?;
    }
    Ok(path)
}

impl ContainerRuntime {
    pub fn new(data_dir: &Path, images: ImageStore) -> Result<ContainerRuntime> {
        if !nix::unistd::geteuid().is_root() {
            return Err(RuntimeError::Unsupported(
                "the container runtime needs root (namespaces, overlayfs, cgroups): run devboxd as root".into(),
            ));
        }
        let boxes_dir = data_dir.join("boxes");
        std::fs::create_dir_all(&boxes_dir).map_err(io(format!("create {}", boxes_dir.display())))?;
        std::fs::set_permissions(&boxes_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io("restrict boxes dir"))?;
        let agent = install_agent(&data_dir.join("bin"))?;
        let cgroups = Cgroups::detect("devboxd")?;
        let (disks, disk_note) = match disk::Disks::probe(&data_dir.join("disks")) {
            Ok(d) => (Some(d), "per-box ext4 disks (ENOSPC at the size limit)".to_string()),
            Err(why) => (None, format!("disk size NOT enforced: {why}")),
        };
        Ok(ContainerRuntime { boxes_dir, images, agent, cgroups, disks, disk_note })
    }

    pub fn describe(&self) -> String {
        format!("container runtime ({}, {}, agent {})", self.cgroups.describe(), self.disk_note, self.agent.display())
    }

    /// Where the box's writable layer lives: on its own disk when disks are enforced.
    fn layer_root(&self, id: &str) -> PathBuf {
        match self.disks {
            Some(_) => self.box_dir(id).join("disk"),
            None => self.box_dir(id),
        }
    }

    fn box_dir(&self, id: &str) -> PathBuf {
        self.boxes_dir.join(id)
    }

    fn state(state: &RuntimeState) -> Result<State> {
        serde_json::from_value(state.clone()).map_err(|_| RuntimeError::Gone)
    }

    /// The init pid if it is still this box's (a recycled pid would not be in our cgroup).
    fn live_init(&self, id: &str, state: &RuntimeState) -> Option<i32> {
        let st = Self::state(state).ok()?;
        self.cgroups.procs(id).contains(&st.init_pid).then_some(st.init_pid)
    }

    fn log_tail(&self, id: &str) -> String {
        use std::io::{Read, Seek, SeekFrom};
        let mut log = String::new();
        if let Ok(mut f) = std::fs::File::open(self.box_dir(id).join("agent.log")) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.seek(SeekFrom::Start(len.saturating_sub(8192)));
            let mut buf = Vec::new();
            let _ = f.take(8192).read_to_end(&mut buf);
            log = String::from_utf8_lossy(&buf).into_owned();
        }
        let lines: Vec<&str> = log.lines().rev().take(5).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }

    async fn boot(&self, spec: &BoxSpec) -> Result<Launched> {
        let t0 = std::time::Instant::now();
        let lower = self.images.rootfs(&spec.image)?;
        let dir = self.box_dir(&spec.id);
        let socket = dir.join("agent.sock");
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(RuntimeError::Unsupported(format!(
                "data dir path too long for a unix socket ({}): choose a shorter --data-dir",
                socket.display()
            )));
        }
        std::fs::create_dir_all(dir.join("root")).map_err(io(format!("create {}", dir.display())))?;
        if let Some(d) = &self.disks {
            let (d, id, at, size) = (d.clone(), spec.id.clone(), self.layer_root(&spec.id), spec.limits.disk_bytes);
            tokio::task::spawn_blocking(move || d.attach(&id, size, &at))
                .await
                .map_err(|e| RuntimeError::Transport(e.to_string()))??;
        }
        let t_disk = t0.elapsed();
        let layer = self.layer_root(&spec.id);
        for sub in ["upper", "work"] {
            std::fs::create_dir_all(layer.join(sub)).map_err(io(format!("create {}", layer.join(sub).display())))?;
        }
        let cgroups = self.cgroups.clone();
        let (id, limits) = (spec.id.clone(), spec.limits);
        let cgroup_procs = tokio::task::spawn_blocking(move || cgroups.create(&id, &limits))
            .await
            .map_err(|e| RuntimeError::Transport(e.to_string()))??;
        let p = |s: &str| dir.join(s).display().to_string();
        let mut lower_dirs: Vec<String> = spec.layers.iter().map(|l| l.display().to_string()).collect();
        lower_dirs.push(lower.display().to_string());
        let boot = ContainerBoot {
            lower_dirs,
            upper_dir: layer.join("upper").display().to_string(),
            work_dir: layer.join("work").display().to_string(),
            root_dir: p("root"),
            hostname: spec.hostname.clone(),
            socket_path: socket.display().to_string(),
            cgroup_procs,
            pid_file: p("init.pid"),
        };
        let t_cgroup = t0.elapsed();
        let boot_path = dir.join("boot.json");
        std::fs::write(&boot_path, serde_json::to_vec_pretty(&boot).expect("serializable"))
            .map_err(io("write boot file"))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("agent.log"))
            .map_err(io("open agent log"))?;
        let status = tokio::process::Command::new(&self.agent)
            // The box can read nothing of the server's environment through its init.
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .arg("container-init")
            .arg(&boot_path)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().map_err(io("dup agent log"))?)
            .stderr(log)
            .status()
            .await
            .map_err(io(format!("start {}", self.agent.display())))?;
        if !status.success() {
            return Err(RuntimeError::AgentNotReady(format!(
                "box launcher failed ({status}): {}",
                self.log_tail(&spec.id)
            )));
        }
        let t_launch = t0.elapsed();
        let pid: i32 = std::fs::read_to_string(dir.join("init.pid"))
            .map_err(io("read init pid"))?
            .trim()
            .parse()
            .map_err(|_| RuntimeError::AgentNotReady("bad init pid file".into()))?;
        let state = serde_json::to_value(State { init_pid: pid }).expect("serializable");
        let agent = match AgentClient::connect(&socket, AGENT_READY_TIMEOUT).await {
            Ok(a) => a,
            Err(e) => {
                let tail = self.log_tail(&spec.id);
                return Err(RuntimeError::AgentNotReady(format!("{e}; agent log: {tail}")));
            }
        };
        tracing::debug!(
            id = %spec.id,
            disk_us = t_disk.as_micros() as u64,
            cgroups_us = t_cgroup.as_micros() as u64,
            launched_us = t_launch.as_micros() as u64,
            ready_us = t0.elapsed().as_micros() as u64,
            "box booted"
        );
        Ok(Launched { state, agent })
    }
}

/// Bytes allocated by a directory tree (like `du -s`).
pub fn tree_size(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else { continue };
        total += meta.blocks() * 512;
        if meta.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        }
    }
    total
}

#[async_trait::async_trait]
impl Runtime for ContainerRuntime {
    fn kind(&self) -> &'static str {
        "container"
    }

    async fn create(&self, spec: &BoxSpec) -> Result<Launched> {
        // A box booting again on its kept disk (after hibernation) must never lose it.
        let rebooting = self.layer_root(&spec.id).join("upper").is_dir()
            || self.disks.as_ref().is_some_and(|d| d.has_image(&spec.id));
        match self.boot(spec).await {
            Ok(l) => Ok(l),
            Err(e) => {
                let _ = if rebooting {
                    self.stop(&spec.id, &serde_json::Value::Null).await
                } else {
                    self.destroy(&spec.id, &serde_json::Value::Null).await
                };
                Err(e)
            }
        }
    }

    async fn stop(&self, id: &str, state: &RuntimeState) -> Result<()> {
        if let Some(pid) = self.live_init(id, state) {
            let _ = self.cgroups.freeze(id, false);
            // SAFETY: kill(2) on a pid verified to be this box's init.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let (c, idc) = (self.cgroups.clone(), id.to_string());
        tokio::task::spawn_blocking(move || c.remove(&idc)).await.map_err(|e| RuntimeError::Transport(e.to_string()))?
    }

    fn disk_usage(&self, id: &str) -> u64 {
        match &self.disks {
            Some(d) => d.used(&self.layer_root(id)).unwrap_or(0),
            None => tree_size(&self.box_dir(id).join("upper")),
        }
    }

    async fn attach(&self, id: &str, state: &RuntimeState) -> Result<AgentClient> {
        if self.live_init(id, state).is_none() {
            return Err(RuntimeError::Gone);
        }
        AgentClient::connect(&self.box_dir(id).join("agent.sock"), Duration::from_secs(3)).await
    }

    fn alive(&self, id: &str, state: &RuntimeState) -> bool {
        self.live_init(id, state).is_some()
    }

    fn agent(&self, id: &str) -> AgentClient {
        AgentClient::lazy(&self.box_dir(id).join("agent.sock"))
    }

    async fn freeze(&self, id: &str, _state: &RuntimeState) -> Result<()> {
        let (c, id) = (self.cgroups.clone(), id.to_string());
        tokio::task::spawn_blocking(move || c.freeze(&id, true))
            .await
            .map_err(|e| RuntimeError::Transport(e.to_string()))?
    }

    async fn thaw(&self, id: &str, _state: &RuntimeState) -> Result<()> {
        let (c, id) = (self.cgroups.clone(), id.to_string());
        tokio::task::spawn_blocking(move || c.freeze(&id, false))
            .await
            .map_err(|e| RuntimeError::Transport(e.to_string()))?
    }

    async fn snapshot(&self, id: &str, _state: &RuntimeState, dest: &Path) -> Result<u64> {
        let upper = self.layer_root(id).join("upper");
        if !upper.is_dir() {
            return Err(RuntimeError::Gone);
        }
        if dest.exists() {
            return Err(RuntimeError::Unsupported(format!("{} exists", dest.display())));
        }
        // cp -a keeps what overlayfs needs: owners, modes, times, whiteout devices and the
        // trusted.overlay.* xattrs of opaque directories.
        let out = tokio::process::Command::new("cp")
            .arg("-a")
            .arg(&upper)
            .arg(dest)
            .output()
            .await
            .map_err(|e| RuntimeError::io("run cp", e))?;
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(dest);
            return Err(RuntimeError::Unsupported(format!(
                "copying the box's disk failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let dest = dest.to_path_buf();
        tokio::task::spawn_blocking(move || tree_size(&dest)).await.map_err(|e| RuntimeError::Transport(e.to_string()))
    }

    async fn destroy(&self, id: &str, state: &RuntimeState) -> Result<()> {
        if let Some(pid) = self.live_init(id, state) {
            // Killing a pid namespace's init kills every process in it.
            let _ = self.cgroups.freeze(id, false);
            // SAFETY: kill(2) on a pid verified to be this box's init.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let (c, idc, dir, disks, at) =
            (self.cgroups.clone(), id.to_string(), self.box_dir(id), self.disks.clone(), self.layer_root(id));
        tokio::task::spawn_blocking(move || {
            c.remove(&idc)?;
            // Unmount before deleting anything: the disk's files are not ours to walk.
            if let Some(d) = disks {
                d.remove(&idc, &at)?;
            }
            if disk::is_mountpoint(&at) {
                return Err(RuntimeError::Unsupported(format!("{} is still mounted", at.display())));
            }
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(RuntimeError::io(format!("remove {}", dir.display()), e)),
            }
        })
        .await
        .map_err(|e| RuntimeError::Transport(e.to_string()))?
    }

    fn usage(&self, id: &str) -> Usage {
        self.cgroups.usage(id)
    }
}
