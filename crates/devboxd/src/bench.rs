//! `devboxd bench`: latency of a running server next to raw baselines measured in the same
//! run on the same machine, with the ratio between them.
//!
//! Baselines: a raw sandbox made in-process (namespaces + overlay of the same image + pivot_root
//! + exec /bin/true), `nsenter` into a running box, and the host memory of raw idle sandboxes.

use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use serde_json::{json, Value};
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct BenchArgs {
    /// Base URL of the server.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    #[arg(long, env = "RUNLOOP_API_KEY")]
    pub api_key: String,
    /// Image dir of the server (for the raw-sandbox baseline).
    #[arg(long, default_value = "/var/lib/devboxd/images")]
    pub image_dir: PathBuf,
    /// Sequential creates to time.
    #[arg(long, default_value_t = 50)]
    pub creates: usize,
    /// Exec round trips to time.
    #[arg(long, default_value_t = 200)]
    pub execs: usize,
    /// Concurrent creates.
    #[arg(long, default_value_t = 20)]
    pub concurrent: usize,
}

struct Api {
    client: Client<HttpConnector, Full<Bytes>>,
    url: String,
    key: String,
}

impl Api {
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<(u16, Value), String> {
        let data = body.map(|b| b.to_string()).unwrap_or_default();
        let req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.url))
            .header("authorization", format!("Bearer {}", self.key))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(data)))
            .map_err(|e| e.to_string())?;
        let resp = self.client.request(req).await.map_err(|e| format!("{path}: {e}"))?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
    }

    async fn create_running(&self) -> Result<String, String> {
        let (s, v) = self.call("POST", "/v1/devboxes/create_and_await_running", Some(json!({"name": "bench"}))).await?;
        if s != 200 || v["status"] != "running" {
            return Err(format!("create failed: {s} {v}"));
        }
        Ok(v["id"].as_str().unwrap_or_default().to_string())
    }

    async fn shutdown(&self, id: &str) {
        let _ = self.call("POST", &format!("/v1/devboxes/{id}/shutdown"), None).await;
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn summary(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (pct(&v, 0.5), pct(&v, 0.99))
}

fn row(name: &str, ours: (f64, f64), base_name: &str, base: (f64, f64), unit: &str) {
    println!(
        "{name:<34} p50 {:>8.2} {unit}  p99 {:>8.2} {unit} | baseline {base_name:<28} p50 {:>8.2} {unit}  p99 {:>8.2} {unit} | ratio p50 {:.2}x",
        ours.0,
        ours.1,
        base.0,
        base.1,
        ours.0 / base.0
    );
}

/// One raw sandbox: fork, unshare namespaces, overlay the image, pivot, exec `argv`.
/// Returns the child pid. Only syscalls run between fork and exec (the caller is threaded).
fn raw_sandbox(lower: &Path, dir: &Path, argv: &[&str]) -> Result<i32, String> {
    for sub in ["upper", "work", "root"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(|e| e.to_string())?;
    }
    let c = |s: &str| CString::new(s).unwrap();
    let opts = c(&format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        dir.join("upper").display(),
        dir.join("work").display()
    ));
    let root = c(&dir.join("root").display().to_string());
    let (overlay, slash, dot, proc_) = (c("overlay"), c("/"), c("."), c("proc"));
    let args: Vec<CString> = argv.iter().map(|a| c(a)).collect();
    let mut argp: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argp.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: the child only makes raw syscalls on memory prepared before the fork, then execs
    // or exits.
    unsafe {
        let pid = libc::fork();
        if pid < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        if pid == 0 {
            let flags = libc::CLONE_NEWNS
                | libc::CLONE_NEWUTS
                | libc::CLONE_NEWIPC
                | libc::CLONE_NEWNET
                | libc::CLONE_NEWCGROUP
                | libc::CLONE_NEWPID;
            if libc::unshare(flags) != 0 {
                libc::_exit(10);
            }
            // pid 1 of the new namespace, as in a devbox.
            let inner = libc::fork();
            if inner != 0 {
                let mut st = 0;
                libc::waitpid(inner, &mut st, 0);
                libc::_exit(if libc::WIFEXITED(st) { libc::WEXITSTATUS(st) } else { 11 });
            }
            if libc::mount(
                std::ptr::null(),
                slash.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
                || libc::mount(overlay.as_ptr(), root.as_ptr(), overlay.as_ptr(), 0, opts.as_ptr().cast()) != 0
                || libc::chdir(root.as_ptr()) != 0
                || libc::mount(proc_.as_ptr(), proc_.as_ptr(), proc_.as_ptr(), 0, std::ptr::null()) != 0
                || libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) != 0
                || libc::umount2(dot.as_ptr(), libc::MNT_DETACH) != 0
            {
                libc::_exit(12);
            }
            libc::execve(argp[0], argp.as_ptr(), envp.as_ptr());
            libc::_exit(13);
        }
        Ok(pid)
    }
}

fn wait_ok(pid: i32) -> Result<(), String> {
    let mut st = 0;
    // SAFETY: waitpid on our own child.
    unsafe { libc::waitpid(pid, &mut st, 0) };
    if libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0 {
        Ok(())
    } else {
        Err(format!("raw sandbox failed (wait status {st})"))
    }
}

/// Time `n` raw sandboxes running /bin/true, sequentially (ms each).
fn raw_creates(lower: &Path, scratch: &Path, n: usize) -> Result<Vec<f64>, String> {
    let mut v = vec![];
    for i in 0..n {
        let dir = scratch.join(format!("raw{i}"));
        let t = Instant::now();
        let pid = raw_sandbox(lower, &dir, &["/bin/true"])?;
        wait_ok(pid)?;
        v.push(t.elapsed().as_secs_f64() * 1000.0);
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(v)
}

fn pss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Pss:").and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()))
        })
        .unwrap_or(0)
}

fn box_pids(id: &str) -> Vec<i32> {
    std::fs::read_to_string(format!("/sys/fs/cgroup/pids/devboxd/{id}/cgroup.procs"))
        .or_else(|_| std::fs::read_to_string(format!("/sys/fs/cgroup/devboxd/{id}/cgroup.procs")))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// The box's init: the lowest pid in its cgroup.
fn box_init_pid(id: &str) -> Option<i32> {
    box_pids(id).into_iter().min()
}

pub async fn run(a: BenchArgs) -> Result<(), String> {
    let api = std::sync::Arc::new(Api {
        client: Client::builder(hyper_util::rt::TokioExecutor::new()).build_http(),
        url: a.url.trim_end_matches('/').to_string(),
        key: a.api_key.clone(),
    });
    let lower = devbox_runtime::image::ImageStore::new(&a.image_dir)
        .rootfs(devbox_runtime::image::DEFAULT_IMAGE)
        .map_err(|e| format!("{e} (pass the server's --image-dir)"))?;
    let scratch = std::env::temp_dir().join(format!("devboxd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|e| e.to_string())?;
    println!(
        "devboxd bench against {} ({} cores)",
        api.url,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );

    // Warm-up: page cache, connection pool.
    let id = api.create_running().await?;
    api.shutdown(&id).await;

    // 1. create -> running.
    let mut ours = vec![];
    for _ in 0..a.creates {
        let t = Instant::now();
        let id = api.create_running().await?;
        ours.push(t.elapsed().as_secs_f64() * 1000.0);
        api.shutdown(&id).await;
    }
    let (l2, s2, n) = (lower.clone(), scratch.clone(), a.creates);
    let base = tokio::task::spawn_blocking(move || raw_creates(&l2, &s2, n)).await.map_err(|e| e.to_string())??;
    row("create -> running", summary(ours), "raw ns+overlay+exec true", summary(base), "ms");

    // 2. exec round trip of `true`.
    let id = api.create_running().await?;
    let mut ours = vec![];
    for _ in 0..a.execs {
        let t = Instant::now();
        let (s, v) =
            api.call("POST", &format!("/v1/devboxes/{id}/execute_sync"), Some(json!({"command": "true"}))).await?;
        if s != 200 || v["exit_status"] != 0 {
            return Err(format!("exec failed: {s} {v}"));
        }
        ours.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let pid = box_init_pid(&id).ok_or("cannot find the box's init pid for the nsenter baseline")?;
    let mut base = vec![];
    for _ in 0..a.execs {
        let t = Instant::now();
        let st = std::process::Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-a", "/bin/true"])
            .status()
            .map_err(|e| format!("nsenter: {e}"))?;
        if !st.success() {
            return Err("nsenter baseline failed".into());
        }
        base.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    row("exec `true` round trip", summary(ours), "nsenter -a /bin/true", summary(base), "ms");
    api.shutdown(&id).await;

    // 3. concurrent creates.
    let t = Instant::now();
    let mut tasks = vec![];
    for _ in 0..a.concurrent {
        let api = api.clone();
        tasks.push(tokio::spawn(async move { api.create_running().await }));
    }
    let mut ids = vec![];
    for task in tasks {
        ids.push(task.await.map_err(|e| e.to_string())??);
    }
    let ours_wall = t.elapsed().as_secs_f64() * 1000.0;
    for id in &ids {
        api.shutdown(id).await;
    }
    let (l2, s2, n) = (lower.clone(), scratch.clone(), a.concurrent);
    let base_wall = tokio::task::spawn_blocking(move || -> Result<f64, String> {
        let t = Instant::now();
        let pids: Vec<i32> =
            (0..n).map(|i| raw_sandbox(&l2, &s2.join(format!("conc{i}")), &["/bin/true"])).collect::<Result<_, _>>()?;
        for p in pids {
            wait_ok(p)?;
        }
        Ok(t.elapsed().as_secs_f64() * 1000.0)
    })
    .await
    .map_err(|e| e.to_string())??;
    println!(
        "{:<34} wall {:>8.1} ms | baseline {:<28} wall {:>8.1} ms | ratio {:.2}x",
        format!("{} concurrent creates", a.concurrent),
        ours_wall,
        "raw sandboxes, all at once",
        base_wall,
        ours_wall / base_wall
    );

    // 4. host memory per idle box: proportional set size of every process of the box (its
    // init, the agent), against a raw sandbox idling in `sleep` (its waiter and sleep).
    let n = a.concurrent;
    let mut ids = vec![];
    for _ in 0..n {
        ids.push(api.create_running().await?);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut ours_kib = 0;
    let mut cg_bytes = 0u64;
    for id in &ids {
        for pid in box_pids(id) {
            ours_kib += pss_kib(pid);
        }
        cg_bytes += std::fs::read_to_string(format!("/sys/fs/cgroup/memory/devboxd/{id}/memory.usage_in_bytes"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    for id in &ids {
        api.shutdown(id).await;
    }
    let ours_mem = ours_kib as f64 / 1024.0 / n as f64;
    let (l2, s2) = (lower.clone(), scratch.clone());
    let base_mem = tokio::task::spawn_blocking(move || -> Result<f64, String> {
        let pids: Vec<i32> = (0..n)
            .map(|i| raw_sandbox(&l2, &s2.join(format!("idle{i}")), &["/bin/sleep", "600"]))
            .collect::<Result<_, _>>()?;
        std::thread::sleep(Duration::from_millis(500));
        let mut kib = 0;
        for &p in &pids {
            kib += pss_kib(p);
            let kids = std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
            for k in kids.split_whitespace().filter_map(|k| k.parse::<i32>().ok()) {
                kib += pss_kib(k);
                // The sandbox's init is the child of our waiter: killing it tears down its
                // pid namespace. SAFETY: kill(2) on the sandbox init we forked.
                unsafe { libc::kill(k, libc::SIGKILL) };
            }
            // SAFETY: kill(2) and waitpid(2) on our own child.
            unsafe { libc::kill(p, libc::SIGKILL) };
            let mut st = 0;
            unsafe { libc::waitpid(p, &mut st, 0) };
        }
        Ok(kib as f64 / 1024.0 / n as f64)
    })
    .await
    .map_err(|e| e.to_string())??;
    println!(
        "{:<34} {:>8.2} MiB/box | baseline {:<28} {:>8.2} MiB/box | ratio {:.2}x",
        "host memory per idle box (PSS)",
        ours_mem,
        "raw sandbox idling in sleep",
        base_mem,
        ours_mem / base_mem.max(0.01)
    );
    if cg_bytes > 0 {
        println!(
            "{:<34} {:>8.2} MiB/box (memory cgroup usage, page cache included)",
            "",
            cg_bytes as f64 / n as f64 / 1048576.0
        );
    }
    executions_and_streaming(&api).await?;
    pty_echo(&api).await?;
    lifecycle(&api, &lower, &scratch).await?;
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}

/// 200 concurrent short executions across 10 boxes, and SSE streaming throughput.
async fn executions_and_streaming(api: &std::sync::Arc<Api>) -> Result<(), String> {
    let mut ids = vec![];
    for _ in 0..10 {
        ids.push(api.create_running().await?);
    }
    let t = Instant::now();
    let mut tasks = vec![];
    for i in 0..200 {
        let (api, id) = (api.clone(), ids[i % ids.len()].clone());
        tasks.push(tokio::spawn(async move {
            let (s, v) = api
                .call("POST", &format!("/v1/devboxes/{id}/execute_sync"), Some(json!({"command": format!("echo {i}")})))
                .await?;
            Ok::<bool, String>(s == 200 && v["exit_status"] == 0 && v["stdout"] == format!("{i}\n"))
        }));
    }
    let mut errors = 0;
    for task in tasks {
        if !task.await.map_err(|e| e.to_string())?? {
            errors += 1;
        }
    }
    let ours = t.elapsed().as_secs_f64() * 1000.0;
    let pids: Vec<i32> = ids.iter().filter_map(|id| box_init_pid(id)).collect();
    let base = tokio::task::spawn_blocking(move || -> Result<f64, String> {
        let t = Instant::now();
        let handles: Vec<_> = (0..200)
            .map(|i| {
                let pid = pids[i % pids.len()];
                std::thread::spawn(move || {
                    std::process::Command::new("nsenter")
                        .args(["-t", &pid.to_string(), "-a", "sh", "-c", &format!("echo {i}")])
                        .output()
                        .map(|o| o.stdout == format!("{i}\n").into_bytes())
                        .unwrap_or(false)
                })
            })
            .collect();
        let ok = handles.into_iter().all(|h| h.join().unwrap_or(false));
        if !ok {
            return Err("nsenter baseline produced wrong output".into());
        }
        Ok(t.elapsed().as_secs_f64() * 1000.0)
    })
    .await
    .map_err(|e| e.to_string())??;
    println!(
        "{:<34} wall {:>8.1} ms, {errors} errors | baseline {:<28} wall {:>8.1} ms | ratio {:.2}x",
        "200 concurrent execs on 10 boxes",
        ours,
        "200 concurrent nsenter",
        base,
        ours / base
    );

    // Streaming: 200 MiB of stdout through SSE, against reading the same command's pipe.
    const BYTES: u64 = 200 << 20;
    let id = ids[0].clone();
    let cmd = format!("yes abcdefghijklmnopqrstuvwxyz0123456789 | head -c {BYTES}");
    let t = Instant::now();
    let (s, v) = api.call("POST", &format!("/v1/devboxes/{id}/execute_async"), Some(json!({"command": cmd}))).await?;
    if s != 200 {
        return Err(format!("execute_async failed: {s} {v}"));
    }
    let eid = v["execution_id"].as_str().unwrap_or_default().to_string();
    let mut got: u64 = 0;
    while got < BYTES {
        let req = hyper::Request::builder()
            .uri(format!("{}/v1/devboxes/{id}/executions/{eid}/stream_stdout_updates?offset={got}", api.url))
            .header("authorization", format!("Bearer {}", api.key))
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let resp = api.client.request(req).await.map_err(|e| e.to_string())?;
        let mut body = resp.into_body();
        let mut pending = Vec::new();
        let before = got;
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.map_err(|e| e.to_string())?.into_data() else { continue };
            pending.extend_from_slice(&data);
            while let Some(pos) = pending.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = pending.drain(..pos + 2).collect();
                if let Some(json) = event.strip_prefix(b"data: ") {
                    if let Ok(v) = serde_json::from_slice::<Value>(json) {
                        got = v["offset"].as_u64().unwrap_or(got);
                    }
                }
            }
        }
        if got == before {
            return Err(format!("stream stalled at {got} of {BYTES} bytes"));
        }
    }
    let ours = BYTES as f64 / 1e6 / t.elapsed().as_secs_f64();
    let pid = box_init_pid(&id).ok_or("no init pid")?;
    let base = tokio::task::spawn_blocking(move || -> Result<f64, String> {
        use std::io::Read;
        let t = Instant::now();
        let mut child = std::process::Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-a", "sh", "-c", &cmd])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut out = child.stdout.take().expect("piped");
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let r = out.read(&mut buf).map_err(|e| e.to_string())?;
            if r == 0 {
                break;
            }
            n += r as u64;
        }
        let _ = child.wait();
        Ok(n as f64 / 1e6 / t.elapsed().as_secs_f64())
    })
    .await
    .map_err(|e| e.to_string())??;
    println!(
        "{:<34} {:>8.1} MB/s | baseline {:<28} {:>8.1} MB/s | ratio {:.2}x",
        "stdout via SSE (200 MiB)",
        ours,
        "nsenter, same command, pipe",
        base,
        ours / base
    );
    for id in &ids {
        api.shutdown(id).await;
    }
    Ok(())
}

async fn wait_status(api: &Api, id: &str, status: &str) -> Result<(), String> {
    for _ in 0..20 {
        let (s, v) = api
            .call(
                "POST",
                &format!("/v1/devboxes/{id}/wait_for_status"),
                Some(json!({"statuses": [status], "timeout_seconds": 10})),
            )
            .await?;
        if s == 200 {
            return Ok(());
        }
        if s != 408 {
            return Err(format!("wait_for_status: {s} {v}"));
        }
    }
    Err(format!("{id} never became {status}"))
}

/// Keystroke echo through the PTY tunnel (WebSocket -> devboxd -> agent -> bash readline and
/// back), against bash readline on a local pty.
async fn pty_echo(api: &std::sync::Arc<Api>) -> Result<(), String> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
    const N: usize = 100;
    let id = api.create_running().await?;
    let (s, t) = api.call("POST", &format!("/v1/devboxes/{id}/create_pty_tunnel"), None).await?;
    let token = t["auth_token"].as_str().ok_or(format!("create_pty_tunnel: {s} {t}"))?.to_string();
    let req = hyper::Request::builder()
        .uri(format!("{}/pty/bench?cols=200&rows=50", api.url))
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = api.client.request(req).await.map_err(|e| e.to_string())?;
    let info: Value = serde_json::from_slice(&resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes())
        .unwrap_or_default();
    let connect = info["connect_url"].as_str().ok_or(format!("GET /pty: {info}"))?;
    let url = format!("ws://{}{connect}", api.url.trim_start_matches("http://"));
    let mut wreq = url.as_str().into_client_request().map_err(|e| e.to_string())?;
    wreq.headers_mut().insert("authorization", format!("Bearer {token}").parse().expect("header value"));
    let (ws, _) = tokio_tungstenite::connect_async(wreq).await.map_err(|e| format!("attach: {e}"))?;
    let (mut tx, mut rx) = ws.split();
    // Let the prompt arrive, then time one keystroke at a time.
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(500), rx.next()).await {}
    let mut ours = vec![];
    for _ in 0..N {
        let t = Instant::now();
        tx.send(Message::Binary(Bytes::from_static(b"x"))).await.map_err(|e| e.to_string())?;
        loop {
            match tokio::time::timeout(Duration::from_secs(5), rx.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) if b.contains(&b'x') => break,
                Ok(Some(Ok(_))) => continue,
                other => return Err(format!("no echo: {other:?}")),
            }
        }
        ours.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let _ = tx.send(Message::Binary(Bytes::from_static(b"\x15exit\r"))).await;
    api.shutdown(&id).await;
    let base = tokio::task::spawn_blocking(local_pty_echo).await.map_err(|e| e.to_string())??;
    row("PTY keystroke echo", summary(ours), "bash readline on a local pty", summary(base), "ms");
    Ok(())
}

fn local_pty_echo() -> Result<Vec<f64>, String> {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let pty = nix::pty::openpty(None, None).map_err(|e| e.to_string())?;
    let slave = pty.slave.as_raw_fd();
    let mut cmd = std::process::Command::new("bash");
    cmd.args(["--norc", "--noprofile", "-i"]).env("TERM", "xterm").env("PS1", "$ ");
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            libc::ioctl(slave, libc::TIOCSCTTY, 0);
            for fd in 0..3 {
                libc::dup2(slave, fd);
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| format!("bash: {e}"))?;
    let mut master = std::fs::File::from(pty.master);
    drop(pty.slave);
    let mut buf = [0u8; 4096];
    std::thread::sleep(Duration::from_millis(300));
    nix::fcntl::fcntl(&master, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))
        .map_err(|e| e.to_string())?;
    while master.read(&mut buf).is_ok() {}
    nix::fcntl::fcntl(&master, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty())).map_err(|e| e.to_string())?;
    let mut v = vec![];
    for _ in 0..100 {
        let t = Instant::now();
        master.write_all(b"x").map_err(|e| e.to_string())?;
        loop {
            let n = master.read(&mut buf).map_err(|e| e.to_string())?;
            if buf[..n].contains(&b'x') {
                break;
            }
        }
        v.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let _ = master.write_all(b"\x15exit\r");
    let _ = child.kill();
    let _ = child.wait();
    Ok(v)
}

/// Suspend/resume, snapshots, create from snapshot, hibernate/restore.
async fn lifecycle(api: &std::sync::Arc<Api>, lower: &Path, scratch: &Path) -> Result<(), String> {
    let id = api.create_running().await?;
    let _ = api
        .call(
            "POST",
            &format!("/v1/devboxes/{id}/execute_sync"),
            Some(json!({"command": "for i in $(seq 20); do sleep 1000 & done"})),
        )
        .await?;
    let (mut sus, mut res) = (vec![], vec![]);
    for _ in 0..50 {
        let t = Instant::now();
        api.call("POST", &format!("/v1/devboxes/{id}/suspend"), None).await?;
        wait_status(api, &id, "suspended").await?;
        sus.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        api.call("POST", &format!("/v1/devboxes/{id}/resume"), None).await?;
        wait_status(api, &id, "running").await?;
        res.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let freezer = PathBuf::from(format!("/sys/fs/cgroup/freezer/devboxd/{id}/freezer.state"));
    let (mut bf, mut bt) = (vec![], vec![]);
    for _ in 0..50 {
        for (want, v) in [("FROZEN", &mut bf), ("THAWED", &mut bt)] {
            let t = Instant::now();
            std::fs::write(&freezer, want).map_err(|e| format!("freezer: {e}"))?;
            while std::fs::read_to_string(&freezer).map(|s| s.trim() != want).unwrap_or(false) {
                std::hint::spin_loop();
            }
            v.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    row("suspend (API, until suspended)", summary(sus), "raw freezer.state FROZEN", summary(bf), "ms");
    row("resume (API, until running)", summary(res), "raw freezer.state THAWED", summary(bt), "ms");

    // Snapshot of a box that wrote 100 MB, against copying its upper dir.
    let _ = api
        .call(
            "POST",
            &format!("/v1/devboxes/{id}/execute_sync"),
            Some(json!({"command": "head -c 100M /dev/urandom > ~/data.bin; sync"})),
        )
        .await?;
    let t = Instant::now();
    let (s, v) = api.call("POST", &format!("/v1/devboxes/{id}/snapshot_disk"), Some(json!({"name": "bench"}))).await?;
    if s != 200 {
        return Err(format!("snapshot failed: {s} {v}"));
    }
    let snap_ms = t.elapsed().as_secs_f64() * 1000.0;
    let sid = v["id"].as_str().unwrap_or_default().to_string();
    let upper = box_upper(&id).ok_or("cannot find the box's upper dir for the copy baseline")?;
    let dest = scratch.join("copy-baseline");
    let t = Instant::now();
    let st = std::process::Command::new("cp").arg("-a").arg(&upper).arg(&dest).status().map_err(|e| e.to_string())?;
    if !st.success() {
        return Err("cp baseline failed".into());
    }
    let cp_ms = t.elapsed().as_secs_f64() * 1000.0;
    let _ = std::fs::remove_dir_all(&dest);
    println!(
        "{:<34} {:>8.1} ms | baseline {:<28} {:>8.1} ms | ratio {:.2}x",
        "snapshot of a 100 MB diff",
        snap_ms,
        "cp -a of the upper dir",
        cp_ms,
        snap_ms / cp_ms
    );

    // Create from snapshot next to plain create.
    let (mut from, mut plain) = (vec![], vec![]);
    for _ in 0..20 {
        let t = Instant::now();
        let (s, v) =
            api.call("POST", "/v1/devboxes/create_and_await_running", Some(json!({"snapshot_id": sid}))).await?;
        if s != 200 || v["status"] != "running" {
            return Err(format!("create from snapshot failed: {s} {v}"));
        }
        from.push(t.elapsed().as_secs_f64() * 1000.0);
        api.shutdown(v["id"].as_str().unwrap_or_default()).await;
        let t = Instant::now();
        let nid = api.create_running().await?;
        plain.push(t.elapsed().as_secs_f64() * 1000.0);
        api.shutdown(&nid).await;
    }
    row("create from snapshot", summary(from), "plain create", summary(plain), "ms");
    api.shutdown(&id).await;

    // Hibernate and restore a box using 256 MiB, against creating a box.
    let id = api.create_running().await?;
    let _ = api
        .call(
            "POST",
            &format!("/v1/devboxes/{id}/execute_sync"),
            Some(json!({"command": "nohup python3 -c 'import time; b=bytearray(256<<20); b[::4096]=b\"x\"*len(b[::4096]); time.sleep(3600)' >/dev/null 2>&1 & sleep 2"})),
        )
        .await?;
    let t = Instant::now();
    let (s, v) = api.call("POST", &format!("/v1/devboxes/{id}/hibernate"), None).await?;
    if s != 200 || v["hibernated"] != true {
        return Err(format!("hibernate failed: {s} {v}"));
    }
    let hib = t.elapsed().as_secs_f64() * 1000.0;
    let t = Instant::now();
    api.call("POST", &format!("/v1/devboxes/{id}/resume"), None).await?;
    wait_status(api, &id, "running").await?;
    let restore = t.elapsed().as_secs_f64() * 1000.0;
    api.shutdown(&id).await;
    let l2 = lower.to_path_buf();
    let s2 = scratch.join("hib-base");
    let base = tokio::task::spawn_blocking(move || raw_creates(&l2, &s2, 10)).await.map_err(|e| e.to_string())??;
    let base = summary(base).0;
    println!(
        "{:<34} {:>8.1} ms | baseline {:<28} {:>8.1} ms | ratio {:.2}x",
        "hibernate (256 MiB box, disk kept)",
        hib,
        "raw sandbox create",
        base,
        hib / base
    );
    println!(
        "{:<34} {:>8.1} ms | baseline {:<28} {:>8.1} ms | ratio {:.2}x",
        "restore from hibernation (reboot)",
        restore,
        "raw sandbox create",
        base,
        restore / base
    );
    Ok(())
}

/// The box's writable layer on the host (its own disk when disks are enforced).
fn box_upper(id: &str) -> Option<PathBuf> {
    let pid = box_init_pid(id)?;
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mounts")).ok()?;
    let opts = mounts.lines().find(|l| l.starts_with("overlay / "))?.split_whitespace().nth(3)?.to_string();
    opts.split(',').find_map(|o| o.strip_prefix("upperdir=")).map(PathBuf::from)
}
