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

    fn mount(&self, img: &Path, at: &Path) -> Result<()> {
        // util-linux's loop setup handles the free-device race and autoclear for us.
        run(Command::new("mount").args(["-t", "ext4", "-o", "loop,discard,noatime"]).arg(img).arg(at))
    }

    fn unmount(&self, at: &Path) -> Result<()> {
        nix::mount::umount2(at, nix::mount::MntFlags::MNT_DETACH)
            .map_err(|e| RuntimeError::io(format!("unmount {}", at.display()), e.into()))
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
            let pooled = self.take_pooled(size);
            match pooled {
                Some(p) => std::fs::rename(&p, &img).map_err(io("take pooled disk"))?,
                None => self.format(&img, size)?,
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
        Some((st.blocks() - st.blocks_free()) as u64 * st.fragment_size() as u64)
    }

    fn take_pooled(&self, size: u64) -> Option<PathBuf> {
        let prefix = format!("{size}-");
        let rd = std::fs::read_dir(self.dir.join("pool")).ok()?;
        rd.flatten().map(|e| e.path()).find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".img"))
        })
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
