//! Processes: spawn as the box user in a session of their own, pump stdout and stderr as
//! separate frames, and reap every child — including orphans re-parented to us as pid 1.

use bytes::Bytes;
use devbox_protocol::{AgentError, BodyError, ErrorKind, ExecRequest, Exit, Frame, FrameKind, Started};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot};

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// After the main process exits, output still in the pipes is collected for this long; a
/// daemon that inherited the pipes must not keep the execution open forever.
const DRAIN_GRACE: Duration = Duration::from_millis(150);

struct Running {
    pid: i32,
    stdin: Option<Arc<tokio::sync::Mutex<Option<pipe::Sender>>>>,
}

#[derive(Default)]
struct Inner {
    waiting: HashMap<i32, oneshot::Sender<Exit>>,
    running: HashMap<String, Running>,
    next_id: u64,
}

#[derive(Clone, Default)]
pub struct Procs {
    inner: Arc<Mutex<Inner>>,
}

type Tx = mpsc::Sender<Result<Bytes, BodyError>>;

impl Procs {
    /// Reap on every SIGCHLD. Holding the registry lock while calling waitpid makes a spawn
    /// (which also holds it) and the reaping of that very child impossible to interleave.
    pub fn start_reaper(&self) -> std::io::Result<()> {
        let mut sig = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                this.reap();
                if sig.recv().await.is_none() {
                    return;
                }
            }
        });
        Ok(())
    }

    fn reap(&self) {
        let mut g = self.inner.lock().unwrap();
        loop {
            let (pid, exit) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, Exit { code: Some(code), signal: None }),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, Exit { code: None, signal: Some(sig as i32) }),
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => continue,
            };
            if let Some(tx) = g.waiting.remove(&pid.as_raw()) {
                let _ = tx.send(exit);
            }
        }
    }

    /// Start a process and stream its frames into `tx`.
    pub fn spawn(&self, req: ExecRequest, tx: Tx) -> Result<(), AgentError> {
        let mut cmd = if req.shell {
            let mut c = Command::new("/bin/bash");
            c.arg("-lc").arg(&req.command);
            c
        } else {
            let Some((prog, args)) = req.argv.split_first() else {
                return Err(AgentError { kind: ErrorKind::BadRequest, message: "empty argv".into() });
            };
            let mut c = Command::new(prog);
            c.args(args);
            c
        };
        let home = req.user.home.clone();
        let cwd = req.cwd.clone().unwrap_or_else(|| home.clone());
        let cwd = if std::path::Path::new(&cwd).is_dir() { cwd } else { "/".to_string() };
        cmd.env_clear()
            .env("HOME", &home)
            .env("USER", &req.user.name)
            .env("LOGNAME", &req.user.name)
            .env("SHELL", "/bin/bash")
            .env("PATH", PATH)
            .env("LANG", "C.UTF-8")
            .envs(req.env.iter().map(|(k, v)| (k, v)))
            .current_dir(cwd)
            .stdin(if req.stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if req.user.uid != 0 || req.user.gid != 0 {
            cmd.uid(req.user.uid).gid(req.user.gid);
        }
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The agent shields itself from the OOM killer; its children must not be.
                let fd = libc::open(c"/proc/self/oom_score_adj".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd >= 0 {
                    libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                }
                Ok(())
            });
        }

        let mut g = self.inner.lock().unwrap();
        let mut child = cmd.spawn().map_err(|e| AgentError {
            kind: if e.kind() == std::io::ErrorKind::NotFound { ErrorKind::NotFound } else { ErrorKind::Io },
            message: format!("spawn: {e}"),
        })?;
        let pid = child.id() as i32;
        let (exit_tx, exit_rx) = oneshot::channel();
        g.waiting.insert(pid, exit_tx);
        g.next_id += 1;
        let exec_id = format!("e{}", g.next_id);
        let io = |e: std::io::Error| AgentError { kind: ErrorKind::Io, message: e.to_string() };
        let stdin = match child.stdin.take() {
            Some(s) => {
                Some(Arc::new(tokio::sync::Mutex::new(Some(pipe::Sender::from_owned_fd(s.into()).map_err(io)?))))
            }
            None => None,
        };
        let stdout = pipe::Receiver::from_owned_fd(child.stdout.take().expect("piped").into()).map_err(io)?;
        let stderr = pipe::Receiver::from_owned_fd(child.stderr.take().expect("piped").into()).map_err(io)?;
        g.running.insert(exec_id.clone(), Running { pid, stdin });
        drop(g);

        let this = self.clone();
        tokio::spawn(async move {
            let started = Frame::json(FrameKind::Started, &Started { exec_id: exec_id.clone(), pid });
            let _ = tx.send(Ok(started.encode())).await;
            let exit = pump(stdout, stderr, exit_rx, &tx).await;
            this.inner.lock().unwrap().running.remove(&exec_id);
            let _ = tx.send(Ok(Frame::json(FrameKind::Exit, &exit).encode())).await;
        });
        Ok(())
    }

    pub fn signal(&self, exec_id: &str, signal: i32, group: bool) -> Result<(), AgentError> {
        let pid = self.pid_of(exec_id)?;
        let target = if group { -pid } else { pid };
        // SAFETY: kill(2) with a pid we started; ESRCH (already gone) is not an error here.
        let rc = unsafe { libc::kill(target, signal) };
        if rc != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH) {
            return Err(AgentError {
                kind: ErrorKind::BadRequest,
                message: std::io::Error::last_os_error().to_string(),
            });
        }
        Ok(())
    }

    fn pid_of(&self, exec_id: &str) -> Result<i32, AgentError> {
        self.inner.lock().unwrap().running.get(exec_id).map(|r| r.pid).ok_or_else(|| not_running(exec_id))
    }

    pub async fn write_stdin(&self, exec_id: &str, data: Bytes, close: bool) -> Result<(), AgentError> {
        let stdin = {
            let g = self.inner.lock().unwrap();
            let r = g.running.get(exec_id).ok_or_else(|| not_running(exec_id))?;
            r.stdin.clone().ok_or_else(|| AgentError {
                kind: ErrorKind::BadRequest,
                message: "execution was not started with stdin attached".into(),
            })?
        };
        let mut guard = stdin.lock().await;
        let Some(w) = guard.as_mut() else {
            return Err(AgentError { kind: ErrorKind::BadRequest, message: "stdin already closed".into() });
        };
        if !data.is_empty() {
            w.write_all(&data)
                .await
                .map_err(|e| AgentError { kind: ErrorKind::Io, message: format!("write stdin: {e}") })?;
        }
        if close {
            *guard = None;
        }
        Ok(())
    }
}

fn not_running(exec_id: &str) -> AgentError {
    AgentError { kind: ErrorKind::NotFound, message: format!("no running execution {exec_id}") }
}

async fn pump(mut out: pipe::Receiver, mut err: pipe::Receiver, exit_rx: oneshot::Receiver<Exit>, tx: &Tx) -> Exit {
    let mut obuf = vec![0u8; 64 * 1024];
    let mut ebuf = vec![0u8; 64 * 1024];
    let (mut out_open, mut err_open) = (true, true);
    tokio::pin!(exit_rx);
    let mut exit: Option<Exit> = None;
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        if !out_open && !err_open {
            if let Some(e) = exit {
                return e;
            }
        }
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            n = out.read(&mut obuf), if out_open => match n {
                Ok(0) | Err(_) => out_open = false,
                Ok(n) => { let _ = tx.send(Ok(Frame::new(FrameKind::Stdout, Bytes::copy_from_slice(&obuf[..n])).encode())).await; }
            },
            n = err.read(&mut ebuf), if err_open => match n {
                Ok(0) | Err(_) => err_open = false,
                Ok(n) => { let _ = tx.send(Ok(Frame::new(FrameKind::Stderr, Bytes::copy_from_slice(&ebuf[..n])).encode())).await; }
            },
            e = &mut exit_rx, if exit.is_none() => {
                exit = Some(e.unwrap_or(Exit { code: None, signal: None }));
                deadline = Some(tokio::time::Instant::now() + DRAIN_GRACE);
            },
            _ = sleep => {
                // Pipes held open by a background process: the execution is over anyway.
                return exit.expect("deadline set after exit");
            },
        }
        if !out_open && !err_open && exit.is_none() {
            // Both pipes closed: only the exit status is missing.
            return (&mut exit_rx).await.unwrap_or(Exit { code: None, signal: None });
        }
    }
}
