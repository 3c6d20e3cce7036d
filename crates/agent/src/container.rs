//! The in-box half of the container runtime. Runs as root in the host's namespaces, single
//! threaded, before any box code: joins the box's cgroups, unshares every namespace, forks the
//! box's init (pid 1 of the new pid namespace), assembles the root filesystem on an overlay,
//! pivots into it, hardens itself and serves.

use devbox_protocol::ContainerBoot;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::unistd::{chdir, fork, pivot_root, sethostname, ForkResult};
use std::fs;
use std::os::unix::fs::symlink;
use std::os::unix::net::UnixListener;
use std::path::Path;

type R<T> = Result<T, String>;

fn ctx<T, E: std::fmt::Display>(what: &str, r: Result<T, E>) -> R<T> {
    r.map_err(|e| format!("{what}: {e}"))
}

pub fn init(boot_path: &str) -> R<()> {
    let boot: ContainerBoot =
        ctx("parse boot file", serde_json::from_slice(&ctx("read boot file", fs::read(boot_path))?))?;
    for procs in &boot.cgroup_procs {
        ctx(&format!("join cgroup {procs}"), fs::write(procs, b"0"))?;
    }
    // Only the pid namespace here (it applies to the forked child). The others are unshared
    // by the child itself: if this launcher shared the child's mount namespace, the child's
    // pivot_root would move the launcher's root too, racing its pid file write.
    ctx("unshare pid namespace", unshare(CloneFlags::CLONE_NEWPID))?;
    // The init says "ready" on this pipe once its socket is bound, so the launcher exits only
    // when the host can connect at once (or fails at once if setup failed).
    let (ready_r, ready_w) = ctx("readiness pipe", nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC))?;
    // SAFETY: single-threaded at this point; the child only continues this function.
    match ctx("fork box init", unsafe { fork() })? {
        ForkResult::Parent { child } => {
            drop(ready_w);
            let mut byte = [0u8; 1];
            let n = nix::unistd::read(&ready_r, &mut byte).unwrap_or(0);
            if n != 1 {
                return Err("box setup failed (see the lines above)".into());
            }
            // The host learns the init's pid from this file; the launcher then exits and the
            // box's init lives on, owned by its cgroup rather than by the server process.
            ctx("write pid file", fs::write(&boot.pid_file, child.as_raw().to_string()))?;
            Ok(())
        }
        ForkResult::Child => {
            drop(ready_r);
            let listener = match build_box(&boot) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("devbox-agent: box setup failed: {e}");
                    std::process::exit(1);
                }
            };
            let _ = nix::unistd::write(&ready_w, b"1");
            drop(ready_w);
            crate::server::run(listener)
        }
    }
}

fn build_box(boot: &ContainerBoot) -> R<UnixListener> {
    ctx(
        "unshare namespaces",
        unshare(
            CloneFlags::CLONE_NEWNS
                | CloneFlags::CLONE_NEWUTS
                | CloneFlags::CLONE_NEWIPC
                | CloneFlags::CLONE_NEWNET
                | CloneFlags::CLONE_NEWCGROUP,
        ),
    )?;
    let root = Path::new(&boot.root_dir);
    ctx(
        "make mounts private",
        mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>),
    )?;
    let opts = format!("lowerdir={},upperdir={},workdir={}", boot.lower_dirs.join(":"), boot.upper_dir, boot.work_dir);
    ctx("mount overlay root", mount(Some("overlay"), root, Some("overlay"), MsFlags::empty(), Some(opts.as_str())))?;

    // Until the pivot, paths resolve through the host's tree, and the box's own layers (kept
    // disks, snapshots) are box-controlled: the mount points must be real directories, never
    // symlinks (no box process runs yet, so checking then acting cannot race).
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let p = |rel: &str| root.join(rel);
    real_dir(&p("proc"))?;
    ctx("mount /proc", mount(Some("proc"), &p("proc"), Some("proc"), nosuid_nodev_noexec, None::<&str>))?;
    real_dir(&p("sys"))?;
    ctx(
        "mount /sys",
        mount(Some("sysfs"), &p("sys"), Some("sysfs"), nosuid_nodev_noexec | MsFlags::MS_RDONLY, None::<&str>),
    )?;
    real_dir(&p("dev"))?;
    build_dev(root)?;
    real_dir(&p("tmp"))?;
    mask_proc(root)?;

    // Bound while the host path is still visible; the box never sees this socket.
    let _ = fs::remove_file(&boot.socket_path);
    let listener = ctx("bind agent socket", UnixListener::bind(&boot.socket_path))?;

    ctx("chdir to new root", chdir(root))?;
    ctx("pivot_root", pivot_root(".", "."))?;
    ctx("detach old root", umount2(".", MntFlags::MNT_DETACH))?;
    ctx("chdir /", chdir("/"))?;
    // Only now, when every path resolves inside the box, may box-controlled files be written.
    write_hosts(Path::new("/"), &boot.hostname)?;
    ctx("set hostname", sethostname(&boot.hostname))?;
    loopback_up()?;
    // Before the capabilities go: lowering oom_score_adj needs CAP_SYS_RESOURCE. The OOM
    // killer should pick a runaway process in the box, never the box's init.
    let _ = fs::write("/proc/self/oom_score_adj", "-1000");
    // Not dumpable: box root cannot open /proc/1/fd (the host-side log), /proc/1/environ or
    // /proc/1/mem of the agent. Children are dumpable again after their exec.
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) has no memory effects.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    crate::harden::apply()?;
    Ok(listener)
}

/// `p` as a plain directory: a symlink or file the box left there is removed first.
fn real_dir(p: &Path) -> R<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => {
            ctx(&format!("remove {}", p.display()), fs::remove_file(p))?;
            ctx(&format!("mkdir {}", p.display()), fs::create_dir(p))
        }
        Err(_) => ctx(&format!("mkdir {}", p.display()), fs::create_dir(p)),
    }
}

fn mkdir(p: &Path) -> R<()> {
    ctx(&format!("mkdir {}", p.display()), fs::create_dir_all(p))
}

fn bind(src: &Path, dst: &Path, flags: MsFlags) -> R<()> {
    ctx(
        &format!("bind {} -> {}", src.display(), dst.display()),
        mount(Some(src), dst, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>),
    )?;
    if !flags.is_empty() {
        ctx(
            &format!("remount {}", dst.display()),
            mount(None::<&str>, dst, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags, None::<&str>),
        )?;
    }
    Ok(())
}

/// A minimal /dev: a few harmless character devices bound from the host, a private devpts
/// instance (so the box's ptys are its own) and a tmpfs /dev/shm.
fn build_dev(root: &Path) -> R<()> {
    // The caller made it a plain directory.
    let dev = root.join("dev");
    ctx(
        "mount /dev",
        mount(
            Some("tmpfs"),
            &dev,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("mode=755,size=65536k"),
        ),
    )?;
    for name in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = dev.join(name);
        ctx(&format!("create /dev/{name}"), fs::write(&target, b""))?;
        bind(&Path::new("/dev").join(name), &target, MsFlags::empty())?;
    }
    mkdir(&dev.join("pts"))?;
    ctx(
        "mount /dev/pts",
        mount(
            Some("devpts"),
            &dev.join("pts"),
            Some("devpts"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
        ),
    )?;
    ctx("link /dev/ptmx", symlink("pts/ptmx", dev.join("ptmx")))?;
    mkdir(&dev.join("shm"))?;
    ctx(
        "mount /dev/shm",
        mount(
            Some("shm"),
            &dev.join("shm"),
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777,size=65536k"),
        ),
    )?;
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        ctx(&format!("link /dev/{name}"), symlink(target, dev.join(name)))?;
    }
    Ok(())
}

/// /proc knobs that reach the whole host kernel are read-only or hidden, as in Docker's default
/// profile: the box shares the host kernel and its uid 0 is the host's uid 0.
fn mask_proc(root: &Path) -> R<()> {
    let proc_ = root.join("proc");
    for ro in ["sys", "sysrq-trigger", "irq", "bus", "fs"] {
        let p = proc_.join(ro);
        if p.exists() {
            bind(&p, &p, MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC)?;
        }
    }
    let null = root.join("dev/null");
    for hidden in ["kcore", "keys", "timer_list", "sched_debug", "kallsyms", "kmsg"] {
        let p = proc_.join(hidden);
        if p.exists() {
            bind(&null, &p, MsFlags::empty())?;
        }
    }
    for dir in ["acpi", "scsi"] {
        let p = proc_.join(dir);
        if p.is_dir() {
            ctx(
                &format!("mask /proc/{dir}"),
                mount(Some("tmpfs"), &p, Some("tmpfs"), MsFlags::MS_RDONLY, Some("size=0")),
            )?;
        }
    }
    Ok(())
}

/// The hostname must resolve inside the box (sudo complains on stderr otherwise). Runs after
/// the pivot: a symlink in the box's /etc can only point inside the box.
fn write_hosts(root: &Path, hostname: &str) -> R<()> {
    let etc = root.join("etc");
    real_dir(&etc)?;
    let hosts = format!("127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    for (name, content) in [("hosts", hosts), ("hostname", format!("{hostname}\n"))] {
        let path = etc.join(name);
        // Replace whatever the box left there (a symlink would be followed by a write).
        if fs::symlink_metadata(&path).is_ok_and(|m| !m.is_file()) {
            let _ = fs::remove_file(&path);
        }
        ctx(&format!("write /etc/{name}"), fs::write(&path, content))?;
    }
    Ok(())
}

/// A new network namespace starts with `lo` down; local servers in the box need it up.
fn loopback_up() -> R<()> {
    // SAFETY: plain ioctls on a fresh datagram socket with a zeroed, NUL-terminated ifreq.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(format!("socket: {}", std::io::Error::last_os_error()));
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        req.ifr_name[0] = b'l' as libc::c_char;
        req.ifr_name[1] = b'o' as libc::c_char;
        let mut rc = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req);
        if rc == 0 {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            rc = libc::ioctl(fd, libc::SIOCSIFFLAGS, &req);
        }
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(format!("bring up lo: {err}"));
        }
    }
    Ok(())
}
