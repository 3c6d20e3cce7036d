//! Processes: spawn as the box user in a session of their own, keep stdout and stderr apart,
//! and reap every child — including orphans re-parented to us as pid 1.
//!
//! Output is buffered here (bounded) independently of any connection, so the host can lose
//! its connection — or restart — and reattach from the byte offsets it already has.

use bytes::Bytes;
use devbox_protocol::{AgentError, BodyError, ErrorKind, ExecRequest, Exit, Frame, FrameKind, Skipped, Started};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot, watch};

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// After the main process exits, output still in the pipes is collected for this long; a
/// daemon that inherited the pipes must not keep the execution open forever.
const DRAIN_GRACE: Duration = Duration::from_millis(150);
/// Output kept per stream per execution, so a host that lost its connection can reattach
/// from an offset it has. Beyond it the oldest bytes go (a reattach from before them gets a
/// `Skipped` frame).
pub const BUFFER_CAP: usize = 16 << 20;
/// Back-pressure: a pipe is not read while this much of its output has not been handed to an
/// attached host. The process then blocks on write, as it would on a slow terminal; nothing
/// is dropped while a host reads, and sent bytes stay in the buffer for a reattach.
const HIGH_WATER: u64 = (BUFFER_CAP / 2) as u64;
/// Largest data frame sent.
const FRAME_CHUNK: usize = 256 * 1024;
/// Completed executions the host never released are forgotten after this long.
const COMPLETED_TTL: Duration = Duration::from_secs(3600);

#[derive(Default)]
struct Buf {
    base: u64,
    data: Vec<u8>,
}

impl Buf {
    fn push(&mut self, b: &[u8]) {
        self.data.extend_from_slice(b);
        if self.data.len() > BUFFER_CAP {
            let drop = self.data.len() - BUFFER_CAP * 3 / 4;
            self.data.drain(..drop);
            self.base += drop as u64;
        }
    }

    fn end(&self) -> u64 {
        self.base + self.data.len() as u64
    }

    /// Bytes from `off` (at most one frame), and a gap if `off` was already dropped.
    fn from(&self, off: u64) -> (Option<(u64, u64)>, &[u8]) {
        let gap = (off < self.base).then_some((off, self.base));
        let start = (off.max(self.base) - self.base) as usize;
        let end = (start + FRAME_CHUNK).min(self.data.len());
        (gap, &self.data[start.min(end)..end])
    }
}

struct ExecEntry {
    pid: i32,
    stdin: Option<Arc<tokio::sync::Mutex<Option<pipe::Sender>>>>,
    out: Buf,
    err: Buf,
    exit: Option<Exit>,
    completed_at: Option<Instant>,
    /// Bumped on every change, so attached streams wake up.
    version: watch::Sender<u64>,
    /// Offsets handed to the attached host, per stream.
    sent: [u64; 2],
    /// Wakes the pump when the host caught up.
    room: Arc<tokio::sync::Notify>,
}

#[derive(Default)]
struct Inner {
    waiting: HashMap<i32, oneshot::Sender<Exit>>,
    execs: HashMap<String, ExecEntry>,
    next_id: u64,
}

#[derive(Clone, Default)]
pub struct Procs {
    inner: Arc<Mutex<Inner>>,
}

type Tx = mpsc::Sender<Result<Bytes, BodyError>>;

fn bad(m: impl Into<String>) -> AgentError {
    AgentError { kind: ErrorKind::BadRequest, message: m.into() }
}

fn not_found(exec_id: &str) -> AgentError {
    AgentError { kind: ErrorKind::NotFound, message: format!("no execution {exec_id}") }
}

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

    /// Spawn `cmd` and register for its exit status, atomically with respect to the reaper.
    /// For other features (terminals) that run processes of their own.
    #[allow(dead_code)] // used by the terminal feature
    pub fn spawn_tracked(&self, cmd: &mut Command) -> std::io::Result<(Child, oneshot::Receiver<Exit>)> {
        let mut g = self.inner.lock().unwrap();
        let child = cmd.spawn()?;
        let (tx, rx) = oneshot::channel();
        g.waiting.insert(child.id() as i32, tx);
        Ok((child, rx))
    }

    /// Start a process; its output is buffered here. Returns the execution id.
    pub fn spawn(&self, req: ExecRequest) -> Result<String, AgentError> {
        if let Some(id) = &req.id {
            if id.is_empty() || id.len() > 128 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(bad("execution id must be 1-128 letters, digits, '_' or '-'"));
            }
            if self.inner.lock().unwrap().execs.contains_key(id) {
                return Err(AgentError { kind: ErrorKind::BadRequest, message: format!("execution {id} exists") });
            }
        }
        let mut cmd = build_command(&req)?;
        let mut g = self.inner.lock().unwrap();
        // Forget completed executions nobody came back for.
        g.execs.retain(|_, e| e.completed_at.is_none_or(|t| t.elapsed() < COMPLETED_TTL));
        let mut child = cmd.spawn().map_err(|e| AgentError {
            kind: if e.kind() == std::io::ErrorKind::NotFound { ErrorKind::NotFound } else { ErrorKind::Io },
            message: format!("spawn: {e}"),
        })?;
        let pid = child.id() as i32;
        let (exit_tx, exit_rx) = oneshot::channel();
        g.waiting.insert(pid, exit_tx);
        let exec_id = match req.id {
            Some(id) => id,
            None => {
                g.next_id += 1;
                format!("e{}", g.next_id)
            }
        };
        let io = |e: std::io::Error| AgentError { kind: ErrorKind::Io, message: e.to_string() };
        let stdin = match child.stdin.take() {
            Some(s) => {
                Some(Arc::new(tokio::sync::Mutex::new(Some(pipe::Sender::from_owned_fd(s.into()).map_err(io)?))))
            }
            None => None,
        };
        let stdout = pipe::Receiver::from_owned_fd(child.stdout.take().expect("piped").into()).map_err(io)?;
        let stderr = pipe::Receiver::from_owned_fd(child.stderr.take().expect("piped").into()).map_err(io)?;
        g.execs.insert(
            exec_id.clone(),
            ExecEntry {
                pid,
                stdin,
                out: Buf::default(),
                err: Buf::default(),
                exit: None,
                completed_at: None,
                version: watch::channel(0).0,
                sent: [0, 0],
                room: Arc::new(tokio::sync::Notify::new()),
            },
        );
        drop(g);
        let this = self.clone();
        let id = exec_id.clone();
        tokio::spawn(async move { this.pump(&id, stdout, stderr, exit_rx).await });
        Ok(exec_id)
    }

    fn with<T>(&self, exec_id: &str, f: impl FnOnce(&mut ExecEntry) -> T) -> Option<T> {
        self.inner.lock().unwrap().execs.get_mut(exec_id).map(f)
    }

    fn append(&self, exec_id: &str, stderr: bool, data: &[u8]) {
        self.with(exec_id, |e| {
            if stderr {
                e.err.push(data)
            } else {
                e.out.push(data)
            }
            e.version.send_modify(|v| *v += 1);
        });
    }

    async fn pump(&self, id: &str, mut out: pipe::Receiver, mut err: pipe::Receiver, exit_rx: oneshot::Receiver<Exit>) {
        let mut obuf = vec![0u8; 64 * 1024];
        let mut ebuf = vec![0u8; 64 * 1024];
        let (mut out_open, mut err_open) = (true, true);
        tokio::pin!(exit_rx);
        let mut exit: Option<Exit> = None;
        let mut deadline: Option<tokio::time::Instant> = None;
        let room = self.with(id, |e| e.room.clone()).expect("registered before the pump starts");
        let exit = loop {
            let (out_room, err_room) = self
                .with(id, |e| (e.out.end() - e.sent[0] < HIGH_WATER, e.err.end() - e.sent[1] < HIGH_WATER))
                .unwrap_or((true, true));
            if !out_open && !err_open {
                match exit {
                    Some(e) => break e,
                    // Both pipes closed: only the exit status is missing.
                    None => break (&mut exit_rx).await.unwrap_or(Exit { code: None, signal: None }),
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
                n = out.read(&mut obuf), if out_open && out_room => match n {
                    Ok(0) | Err(_) => out_open = false,
                    Ok(n) => self.append(id, false, &obuf[..n]),
                },
                n = err.read(&mut ebuf), if err_open && err_room => match n {
                    Ok(0) | Err(_) => err_open = false,
                    Ok(n) => self.append(id, true, &ebuf[..n]),
                },
                e = &mut exit_rx, if exit.is_none() => {
                    exit = Some(e.unwrap_or(Exit { code: None, signal: None }));
                    deadline = Some(tokio::time::Instant::now() + DRAIN_GRACE);
                },
                // Pipes held open by a background process: the execution is over anyway.
                _ = sleep => break exit.expect("deadline set after exit"),
                _ = room.notified(), if !(out_room && err_room) => {},
            }
        };
        self.with(id, |e| {
            e.exit = Some(exit);
            e.completed_at = Some(Instant::now());
            e.stdin = None;
            e.version.send_modify(|v| *v += 1);
        });
    }

    /// Stream frames of `exec_id` into `tx`: `Started`, output from the given offsets (with
    /// `Skipped` for dropped ranges), live output, then `Exit`.
    pub fn attach(&self, exec_id: &str, mut out_off: u64, mut err_off: u64, tx: Tx) -> Result<(), AgentError> {
        let (pid, mut version) = self
            .with(exec_id, |e| {
                // An offset past the end (the host lost count) resumes at the end.
                out_off = out_off.min(e.out.end());
                err_off = err_off.min(e.err.end());
                (e.pid, e.version.subscribe())
            })
            .ok_or_else(|| not_found(exec_id))?;
        let this = self.clone();
        let id = exec_id.to_string();
        tokio::spawn(async move {
            let started = Frame::json(FrameKind::Started, &Started { exec_id: id.clone(), pid });
            if tx.send(Ok(started.encode())).await.is_err() {
                return;
            }
            loop {
                version.borrow_and_update();
                // Collect what is available under the lock, send without it.
                let mut frames = vec![];
                let exit = this.with(&id, |e| {
                    for (stream, buf, off) in [(1u8, &e.out, &mut out_off), (2u8, &e.err, &mut err_off)] {
                        // A few frames per round keeps the copy held here small.
                        for _ in 0..4 {
                            let (gap, bytes) = buf.from(*off);
                            if let Some((from, to)) = gap {
                                frames.push(Frame::json(FrameKind::Skipped, &Skipped { stream, from, to }));
                                *off = to;
                            }
                            if bytes.is_empty() {
                                break;
                            }
                            let kind = if stream == 1 { FrameKind::Stdout } else { FrameKind::Stderr };
                            frames.push(Frame::new(kind, Bytes::copy_from_slice(bytes)));
                            *off += bytes.len() as u64;
                        }
                    }
                    (e.exit, e.out.end() == out_off && e.err.end() == err_off)
                });
                for f in frames {
                    if tx.send(Ok(f.encode())).await.is_err() {
                        return;
                    }
                }
                this.with(&id, |e| {
                    e.sent = [out_off, err_off];
                    e.room.notify_one();
                });
                match exit {
                    None => return, // released meanwhile
                    Some((Some(exit), true)) => {
                        let _ = tx.send(Ok(Frame::json(FrameKind::Exit, &exit).encode())).await;
                        return;
                    }
                    // More is buffered than one round sends: go on without waiting.
                    Some((_, false)) => continue,
                    Some((None, true)) => {}
                }
                if version.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(())
    }

    /// The host has everything of a completed execution: forget it.
    pub fn release(&self, exec_id: &str) -> Result<(), AgentError> {
        let mut g = self.inner.lock().unwrap();
        match g.execs.get(exec_id) {
            None => Err(not_found(exec_id)),
            Some(e) if e.exit.is_none() => Err(bad(format!("execution {exec_id} is still running"))),
            Some(_) => {
                g.execs.remove(exec_id);
                Ok(())
            }
        }
    }

    pub fn signal(&self, exec_id: &str, signal: i32, group: bool) -> Result<(), AgentError> {
        let pid = self.with(exec_id, |e| (e.exit.is_none()).then_some(e.pid)).ok_or_else(|| not_found(exec_id))?;
        let Some(pid) = pid else {
            return Ok(()); // already exited
        };
        let target = if group { -pid } else { pid };
        // SAFETY: kill(2) with a pid we started; ESRCH (already gone) is not an error here.
        let rc = unsafe { libc::kill(target, signal) };
        if rc != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH) {
            return Err(bad(std::io::Error::last_os_error().to_string()));
        }
        Ok(())
    }

    pub async fn write_stdin(&self, exec_id: &str, data: Bytes, close: bool) -> Result<(), AgentError> {
        let stdin = self
            .with(exec_id, |e| e.stdin.clone())
            .ok_or_else(|| not_found(exec_id))?
            .ok_or_else(|| bad("execution has no open stdin (not started with stdin attached, or it exited)"))?;
        let mut guard = stdin.lock().await;
        let Some(w) = guard.as_mut() else {
            return Err(bad("stdin already closed"));
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

/// Between fork and exec of a box process: the agent shields itself from the OOM killer
/// (-1000), its children must not inherit that. Async-signal-safe calls only.
pub(crate) fn reset_oom_score() {
    // SAFETY: open/write/close on a static path; no allocation.
    unsafe {
        let fd = libc::open(c"/proc/self/oom_score_adj".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd >= 0 {
            libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
        }
    }
}

fn build_command(req: &ExecRequest) -> Result<Command, AgentError> {
    let mut cmd = if req.shell {
        let mut c = Command::new("/bin/bash");
        c.arg("-lc").arg(&req.command);
        c
    } else {
        let Some((prog, args)) = req.argv.split_first() else {
            return Err(bad("empty argv"));
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
            crate::exec::reset_oom_score();
            Ok(())
        });
    }
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_drops_oldest_and_reports_gaps() {
        let mut b = Buf::default();
        b.push(&vec![b'x'; BUFFER_CAP + 10]);
        assert!(b.data.len() <= BUFFER_CAP);
        assert!(b.base > 0);
        assert_eq!(b.end(), (BUFFER_CAP + 10) as u64);
        let (gap, bytes) = b.from(0);
        assert_eq!(gap, Some((0, b.base)));
        assert_eq!(bytes.len(), FRAME_CHUNK);
        let (gap, bytes) = b.from(b.end());
        assert_eq!((gap, bytes.len()), (None, 0));
    }
}
