//! The container runtime against the real kernel: namespaces, overlayfs, cgroups, seccomp.
//! Needs root and the default image (built into `target/images` on first run if missing).

use devbox_protocol::{ExecRequest, FrameKind, UserSpec};
use devbox_runtime::container::ContainerRuntime;
use devbox_runtime::image::{ImageStore, DEFAULT_IMAGE};
use devbox_runtime::{AgentClient, BoxSpec, Limits, Runtime};
use std::path::PathBuf;
use std::sync::OnceLock;

fn images() -> ImageStore {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let dir = std::env::var("DEVBOXD_IMAGE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/images"));
        ImageStore::new(&dir).build_default(&mut |l| eprintln!("image: {l}")).expect("build default image");
        dir
    });
    ImageStore::new(dir)
}

fn runtime(tag: &str) -> (ContainerRuntime, PathBuf) {
    let data = PathBuf::from(format!("/tmp/devbox-rt-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).unwrap();
    (ContainerRuntime::new(&data, images()).expect("container runtime"), data)
}

fn spec(id: &str, limits: Limits) -> BoxSpec {
    BoxSpec { id: id.into(), hostname: id.into(), image: DEFAULT_IMAGE.into(), layers: vec![], limits }
}

const LIMITS: Limits = Limits { cpu_millis: 1000, memory_bytes: 512 << 20, pids: 256, disk_bytes: 4 << 30 };

#[derive(Debug)]
struct Out {
    stdout: String,
    stderr: String,
    status: i32,
}

async fn run_as(agent: &AgentClient, user: UserSpec, cmd: &str) -> Out {
    let req = ExecRequest {
        command: cmd.into(),
        argv: vec![],
        shell: true,
        user,
        env: vec![],
        cwd: None,
        stdin: false,
        id: None,
    };
    let mut s = agent.exec(&req).await.expect("exec");
    let (mut stdout, mut stderr, mut status) = (vec![], vec![], None);
    while let Some(f) = s.next().await.expect("frame") {
        match f.kind {
            FrameKind::Stdout => stdout.extend_from_slice(&f.payload),
            FrameKind::Stderr => stderr.extend_from_slice(&f.payload),
            FrameKind::Exit => {
                let e: devbox_protocol::Exit = serde_json::from_slice(&f.payload).unwrap();
                status = Some(e.status());
            }
            FrameKind::Error => panic!("exec error: {}", String::from_utf8_lossy(&f.payload)),
            FrameKind::Started | FrameKind::Skipped => {}
        }
    }
    Out {
        stdout: String::from_utf8_lossy(&stdout).into(),
        stderr: String::from_utf8_lossy(&stderr).into(),
        status: status.expect("exit frame"),
    }
}

async fn run(agent: &AgentClient, cmd: &str) -> Out {
    run_as(agent, UserSpec::root(), cmd).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_separates_streams_and_reports_exit_codes() {
    let (rt, data) = runtime("exec");
    let l = rt.create(&spec("rt-exec", LIMITS)).await.expect("create");
    let o = run(&l.agent, "echo out; echo err >&2; exit 3").await;
    assert_eq!((o.stdout.as_str(), o.stderr.as_str(), o.status), ("out\n", "err\n", 3));
    let user = UserSpec { name: "user".into(), uid: 1000, gid: 1000, home: "/home/user".into() };
    let o = run_as(&l.agent, user, "whoami; pwd; sudo -n whoami").await;
    assert_eq!(o.stdout, "user\n/home/user\nroot\n", "stderr: {}", o.stderr);
    let o = run(&l.agent, "sleep 0.2 & echo bg").await;
    assert_eq!(o.status, 0);
    rt.destroy("rt-exec", &l.state).await.unwrap();
    assert!(!data.join("boxes/rt-exec").exists());
    assert!(!PathBuf::from("/sys/fs/cgroup/memory/devboxd/rt-exec").exists());
    let _ = std::fs::remove_dir_all(data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn box_cannot_see_host_files_processes_or_loopback() {
    let (rt, data) = runtime("iso");
    let marker = format!("/tmp/devbox-host-marker-{}", std::process::id());
    std::fs::write(&marker, "secret").unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let l = rt.create(&spec("rt-iso", LIMITS)).await.expect("create");

    assert_eq!(run(&l.agent, "hostname").await.stdout, "rt-iso\n");
    assert_ne!(run(&l.agent, &format!("test -e {marker}")).await.status, 0, "host file visible");
    assert_ne!(run(&l.agent, "test -e /work").await.status, 0, "host /work visible");
    let me = std::process::id();
    let o =
        run(&l.agent, &format!("test -e /proc/{me}/cmdline && cat /proc/{me}/cmdline; ls /proc | grep -c '^[0-9]'"))
            .await;
    let nprocs: u32 = o.stdout.lines().last().unwrap().trim().parse().unwrap();
    assert!(nprocs < 10, "box sees {nprocs} processes: {}", o.stdout);
    let o = run(&l.agent, &format!("timeout 3 bash -c 'echo > /dev/tcp/127.0.0.1/{port}'")).await;
    assert_ne!(o.status, 0, "host loopback listener reachable from the box");
    assert_ne!(run(&l.agent, "echo '|/bin/sh' > /proc/sys/kernel/core_pattern").await.status, 0);
    assert_ne!(run(&l.agent, "mount -t tmpfs x /mnt").await.status, 0, "mount allowed");
    assert_ne!(run(&l.agent, "mknod /tmp/sda b 8 0").await.status, 0, "mknod allowed");
    assert_ne!(run(&l.agent, "unshare -U true").await.status, 0, "user namespace allowed");
    let o = run(&l.agent, "echo hi > /tmp/x && cat /tmp/x && ping -c1 -W1 127.0.0.1 >/dev/null 2>&1; ip link 2>/dev/null; cat /sys/class/net/*/operstate 2>/dev/null | head -3").await;
    assert!(o.stdout.starts_with("hi\n"));
    drop(listener);
    rt.destroy("rt-iso", &l.state).await.unwrap();
    let _ = std::fs::remove_file(marker);
    let _ = std::fs::remove_dir_all(data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_and_pids_limits_hold_inside_the_box() {
    let (rt, data) = runtime("lim");
    let limits = Limits { cpu_millis: 500, memory_bytes: 128 << 20, pids: 64, disk_bytes: 4 << 30 };
    let l = rt.create(&spec("rt-lim", limits)).await.expect("create");
    let o = run(&l.agent, "python3 -c 'b = [bytearray(16 << 20) for _ in range(64)]'").await;
    assert_eq!(o.status, 137, "memory hog not OOM-killed: {} {}", o.stdout, o.stderr);
    assert!(rt.usage("rt-lim").oom_kills >= 1);
    assert_eq!(run(&l.agent, "echo alive").await.stdout, "alive\n", "box died with its hog");
    let fork_loop = r#"python3 -c '
import os, signal, time
kids = []
try:
    for _ in range(500):
        pid = os.fork()
        if pid == 0:
            os.close(1); os.close(2); time.sleep(30); os._exit(0)
        kids.append(pid)
    print("unbounded", len(kids))
except OSError as e:
    print("blocked", len(kids), e.errno)
for k in kids:
    os.kill(k, signal.SIGKILL)
'"#;
    let o = run(&l.agent, fork_loop).await;
    assert!(o.stdout.starts_with("blocked"), "pids limit did not stop the fork loop: {o:?}");
    let forked: u32 = o.stdout.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(forked < 64, "{o:?}");
    assert_eq!(run(&l.agent, "echo alive").await.stdout, "alive\n");
    // The host is fine: it can still start processes.
    assert!(std::process::Command::new("true").status().unwrap().success());
    rt.destroy("rt-lim", &l.state).await.unwrap();
    let _ = std::fs::remove_dir_all(data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeze_thaw_and_reattach() {
    let (rt, data) = runtime("frz");
    let l = rt.create(&spec("rt-frz", LIMITS)).await.expect("create");
    run(&l.agent, "echo 1 > /tmp/state").await;
    rt.freeze("rt-frz", &l.state).await.unwrap();
    rt.thaw("rt-frz", &l.state).await.unwrap();
    let again = rt.attach("rt-frz", &l.state).await.expect("attach");
    assert_eq!(run(&again, "cat /tmp/state").await.stdout, "1\n");
    rt.destroy("rt-frz", &l.state).await.unwrap();
    assert!(matches!(rt.attach("rt-frz", &l.state).await, Err(devbox_runtime::RuntimeError::Gone)));
    let _ = std::fs::remove_dir_all(data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_all_boot() {
    let (rt, data) = runtime("conc");
    let rt = std::sync::Arc::new(rt);
    let mut tasks = vec![];
    for i in 0..12 {
        let rt = rt.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("rt-conc-{i}");
            let l = rt.create(&spec(&id, LIMITS)).await.expect("create");
            let o = run(&l.agent, "hostname").await;
            assert_eq!(o.stdout, format!("{id}\n"));
            (id, l.state)
        }));
    }
    for t in tasks {
        let (id, state) = t.await.unwrap();
        rt.destroy(&id, &state).await.unwrap();
    }
    let _ = std::fs::remove_dir_all(data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_layers_stack_on_the_image() {
    let (rt, data) = runtime("snap");
    let l = rt.create(&spec("rt-snap", LIMITS)).await.expect("create");
    run(&l.agent, "echo one > /etc/one && rm /etc/debian_version && mkdir -p /opt/d && echo x > /opt/d/f").await;
    let layer1 = data.join("layer1");
    rt.freeze("rt-snap", &l.state).await.unwrap();
    let size = rt.snapshot("rt-snap", &l.state, &layer1).await.expect("snapshot");
    rt.thaw("rt-snap", &l.state).await.unwrap();
    assert!(size > 0);
    rt.destroy("rt-snap", &l.state).await.unwrap();

    let mut s2 = spec("rt-snap2", LIMITS);
    s2.layers = vec![layer1.clone()];
    let l2 = rt.create(&s2).await.expect("create from layer");
    let o = run(&l2.agent, "cat /etc/one /opt/d/f; test -e /etc/debian_version && echo present || echo deleted").await;
    assert_eq!(o.stdout, "one\nx\ndeleted\n", "{o:?}");
    run(&l2.agent, "echo two > /etc/two && rm -r /opt/d").await;
    let layer2 = data.join("layer2");
    rt.snapshot("rt-snap2", &l2.state, &layer2).await.expect("snapshot of a snapshot-born box");
    rt.destroy("rt-snap2", &l2.state).await.unwrap();

    let mut s3 = spec("rt-snap3", LIMITS);
    s3.layers = vec![layer2, layer1];
    let l3 = rt.create(&s3).await.expect("create from two layers");
    let o = run(&l3.agent, "cat /etc/one /etc/two; test -e /opt/d && echo present || echo deleted").await;
    assert_eq!(o.stdout, "one\ntwo\ndeleted\n", "{o:?}");
    rt.destroy("rt-snap3", &l3.state).await.unwrap();
    let _ = std::fs::remove_dir_all(data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_enospc_inside_that_box_only() {
    let (rt, data) = runtime("disk");
    let small = Limits { disk_bytes: 256 << 20, ..LIMITS };
    let l = rt.create(&spec("rt-disk", small)).await.expect("create");
    let other = rt.create(&spec("rt-disk2", LIMITS)).await.expect("create");
    let o = run(&l.agent, "head -c 400M /dev/zero > /tmp/big; echo rc=$?").await;
    assert!(o.stderr.contains("No space left"), "{o:?}");
    assert!(rt.disk_usage("rt-disk") > 200 << 20);
    assert!(rt.disk_usage("rt-disk") <= 256 << 20);
    // The box recovers once space is freed; the other box never noticed.
    assert_eq!(run(&l.agent, "rm /tmp/big && echo ok > /tmp/small && cat /tmp/small").await.stdout, "ok\n");
    assert_eq!(run(&other.agent, "head -c 100M /dev/zero > /tmp/f && echo fine").await.stdout, "fine\n");
    rt.destroy("rt-disk", &l.state).await.unwrap();
    rt.destroy("rt-disk2", &other.state).await.unwrap();
    assert!(!data.join("boxes/rt-disk").exists());
    assert!(!data.join("disks/rt-disk.img").exists());
    let _ = std::fs::remove_dir_all(data);
}

/// A box's own layers come back when it boots from a snapshot or after hibernation: symlinks
/// planted there must not make the booting init write through to host paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_symlinks_do_not_reach_the_host_on_reboot() {
    let (rt, data) = runtime("sym");
    let victim = data.join("victim.txt");
    std::fs::write(&victim, "host data").unwrap();
    let victim_dir = data.join("victim-dir");
    std::fs::create_dir_all(&victim_dir).unwrap();
    std::fs::write(victim_dir.join("tty"), "keep").unwrap();
    let l = rt.create(&spec("rt-sym", LIMITS)).await.expect("create");
    let plant = format!(
        "ln -sfn {} /etc/hosts && ln -sfn {} /etc/hostname && rm -rf /tmp && ln -sfn {} /tmp && \
         mv /dev /dev.real 2>/dev/null; ln -sfn {} /dev 2>/dev/null; echo planted",
        victim.display(),
        victim.display(),
        victim_dir.display(),
        victim_dir.display()
    );
    assert!(run(&l.agent, &plant).await.stdout.contains("planted"));
    let layer = data.join("sym-layer");
    rt.snapshot("rt-sym", &l.state, &layer).await.expect("snapshot");
    rt.destroy("rt-sym", &l.state).await.unwrap();
    let mut s2 = spec("rt-sym2", LIMITS);
    s2.layers = vec![layer];
    let l2 = rt.create(&s2).await.expect("boot on the planted layer");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "host data");
    assert_eq!(std::fs::read_to_string(victim_dir.join("tty")).unwrap(), "keep");
    assert_eq!(std::fs::read_dir(&victim_dir).unwrap().count(), 1, "files created in a host dir");
    // The box still works, with its own /dev and /tmp.
    assert_eq!(run(&l2.agent, "echo ok > /dev/null && touch /tmp/x && echo fine").await.stdout, "fine\n");
    rt.destroy("rt-sym2", &l2.state).await.unwrap();
    let _ = std::fs::remove_dir_all(data);
}
