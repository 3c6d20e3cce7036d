//! Per-box disks: each box's writable layer lives on its own ext4 filesystem in a sparse,
//! loop-mounted image of the box's disk size, so a full disk is ENOSPC inside that box and
//! nowhere else. (Project quotas would be cheaper, but need CONFIG_QFMT_V2, which hosts like
//! this one lack.) Formatting takes a few milliseconds, so a small pool of formatted images is
//! kept ready per size.

use crate::{Result, RuntimeError};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// `struct loop_info64` of linux/loop.h.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` of linux/loop.h.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// Formatted images kept ready per size.
const POOL_PER_SIZE: usize = 2;

#[derive(Clone)]
pub struct Disks {
    dir: PathBuf,
    /// Sizes that were asked for, to keep the pool warm for them.
    sizes: Arc<Mutex<HashMap<u64, ()>>>,
    fill: Arc<Mutex<()>>,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RuntimeError {
    let what = what.into();
    move |e| RuntimeError::io(what, e)
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().map_err(io(format!("run {:?}", cmd.get_program())))?;
    if !out.status.success() {
        return Err(RuntimeError::Unsupported(format!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Whether `path` is a mount point (its device differs from its parent's).
pub fn is_mountpoint(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(path), path.parent().map(std::fs::metadata)) {
        (Ok(a), Some(Ok(b))) => a.dev() != b.dev(),
        _ => false,
    }
}

impl Disks {
    /// Checks that loop devices and mkfs.ext4 work here; `None` (with the reason) if not.
    pub fn probe(dir: &Path) -> std::result::Result<Disks, String> {
        if Command::new("mkfs.ext4").arg("-V").output().is_err() {
            return Err("mkfs.ext4 not found (apt-get install e2fsprogs)".into());
        }
        if !Path::new("/dev/loop-control").exists() {
            return Err("no /dev/loop-control (loop devices unavailable)".into());
        }
        std::fs::create_dir_all(dir.join("pool")).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let d = Disks { dir: dir.to_path_buf(), sizes: Default::default(), fill: Default::default() };
        // One real attach proves the whole path works.
        let probe = dir.join("probe-mnt");
        let _ = std::fs::create_dir_all(&probe);
        let img = dir.join("probe.img");
        let r = d.format(&img, 64 << 20).and_then(|()| d.mount(&img, &probe)).and_then(|()| d.unmount(&probe));
        let _ = std::fs::remove_file(&img);
        let _ = std::fs::remove_dir(&probe);
        r.map_err(|e| e.to_string())?;
        Ok(d)
    }

    fn format(&self, img: &Path, size: u64) -> Result<()> {
        let f = std::fs::File::create(img).map_err(io(format!("create {}", img.display())))?;
        f.set_len(size).map_err(io("size disk image"))?;
        drop(f);
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"])
            .arg(img))
    }

    /// Attach `img` to a free loop device (auto-cleared on unmount) and mount it at `at`.
    /// In-process: spawning mount(8) cost more than the rest of a box's create.
    fn mount(&self, img: &Path, at: &Path) -> Result<()> {
        use std::os::fd::AsRawFd;
        let file = std::fs::OpenOptions::new().read(true).write(true).open(img).map_err(io("open disk image"))?;
        let ctl = std::fs::File::open("/dev/loop-control").map_err(io("open /dev/loop-control"))?;
        for _ in 0..16 {
            // SAFETY: ioctl on an open loop-control fd; returns a device number.
            let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
            if n < 0 {
                return Err(RuntimeError::io("find a free loop device", std::io::Error::last_os_error()));
            }
            let dev_path = format!("/dev/loop{n}");
            let dev = match std::fs::OpenOptions::new().read(true).write(true).open(&dev_path) {
                Ok(d) => d,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // node not there yet
                Err(e) => return Err(RuntimeError::io(format!("open {dev_path}"), e)),
            };
            let mut cfg: LoopConfig = unsafe { std::mem::zeroed() };
            cfg.fd = file.as_raw_fd() as u32;
            cfg.info.lo_flags = LO_FLAGS_AUTOCLEAR;
            // SAFETY: LOOP_CONFIGURE with a fully initialised loop_config.
            let rc = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg) };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EBUSY) {
                    continue; // another attach took this device first
                }
                return Err(RuntimeError::io(format!("configure {dev_path}"), e));
            }
            // nodev: the box cannot make device nodes (no CAP_MKNOD), and its disk must not
            // carry any from elsewhere either. Not nosuid: sudo lives on the box's layers.
            let flags = nix::mount::MsFlags::MS_NOATIME | nix::mount::MsFlags::MS_NODEV;
            return nix::mount::mount(Some(dev_path.as_str()), at, Some("ext4"), flags, Some("discard"))
                .map_err(|e| RuntimeError::io(format!("mount {dev_path} on {}", at.display()), e.into()));
            // `dev` closes here; with autoclear the device lives as long as the mount.
        }
        Err(RuntimeError::Unsupported("no free loop device after 16 tries".into()))
    }

    fn unmount(&self, at: &Path) -> Result<()> {
        nix::mount::umount2(at, nix::mount::MntFlags::MNT_DETACH)
            .map_err(|e| RuntimeError::io(format!("unmount {}", at.display()), e.into()))
    }

    /// Whether the box has a disk (possibly unmounted, e.g. after a host reboot).
    pub fn has_image(&self, id: &str) -> bool {
        self.image(id).exists()
    }

    fn image(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.img"))
    }

    /// Mount the box's disk at `at` (creating it, from the pool when possible). Idempotent.
    pub fn attach(&self, id: &str, size: u64, at: &Path) -> Result<()> {
        std::fs::create_dir_all(at).map_err(io(format!("create {}", at.display())))?;
        if is_mountpoint(at) {
            return Ok(());
        }
        let img = self.image(id);
        if !img.exists() {
            self.sizes.lock().unwrap().insert(size, ());
            if !self.take_pooled(size, &img) {
                self.format(&img, size)?;
            }
            self.refill();
        }
        self.mount(&img, at)
    }

    /// Unmount and delete the box's disk.
    pub fn remove(&self, id: &str, at: &Path) -> Result<()> {
        if is_mountpoint(at) {
            self.unmount(at)?;
        }
        match std::fs::remove_file(self.image(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(RuntimeError::io("remove disk image", e)),
            _ => Ok(()),
        }
    }

    /// Bytes used on the box's filesystem.
    pub fn used(&self, at: &Path) -> Option<u64> {
        let st = nix::sys::statvfs::statvfs(at).ok()?;
        Some((st.blocks() - st.blocks_free()) * st.fragment_size())
    }

    /// Move a formatted image of `size` to `dest`; false if the pool has none. The rename is
    /// the claim: of two concurrent creates only one can move a given file.
    fn take_pooled(&self, size: u64, dest: &Path) -> bool {
        let prefix = format!("{size}-");
        let Ok(rd) = std::fs::read_dir(self.dir.join("pool")) else { return false };
        for p in rd.flatten().map(|e| e.path()) {
            let ours =
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".img"));
            if ours && std::fs::rename(&p, dest).is_ok() {
                return true;
            }
        }
        false
    }

    /// Top the pool up in the background.
    fn refill(&self) {
        let me = self.clone();
        std::thread::spawn(move || {
            let Ok(_one_at_a_time) = me.fill.try_lock() else { return };
            let sizes: Vec<u64> = me.sizes.lock().unwrap().keys().copied().collect();
            for size in sizes {
                let have = std::fs::read_dir(me.dir.join("pool"))
                    .map(|rd| {
                        rd.flatten()
                            .filter(|e| {
                                e.file_name()
                                    .to_str()
                                    .is_some_and(|n| n.starts_with(&format!("{size}-")) && n.ends_with(".img"))
                            })
                            .count()
                    })
                    .unwrap_or(0);
                for i in have..POOL_PER_SIZE {
                    let tmp = me.dir.join("pool").join(format!(".{size}-{}-{i}.tmp", std::process::id()));
                    if me.format(&tmp, size).is_ok() {
                        let name = format!("{size}-{}-{i}-{}.img", std::process::id(), crate::container::nanos());
                        let _ = std::fs::rename(&tmp, me.dir.join("pool").join(name));
                    } else {
                        let _ = std::fs::remove_file(&tmp);
                    }
                }
            }
        });
    }
}
