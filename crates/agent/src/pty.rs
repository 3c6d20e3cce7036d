//! Interactive terminals: named sessions of a login shell on a pseudo-terminal that outlive
//! their client connections (see `devbox_protocol::pty` for the wire contract).
//!
//! One task per session reads the terminal, feeds a `vt100` screen model and forwards the bytes
//! to the attached client, if any. Screen model and attachment change under one lock, so an
//! attach gets a redraw of exactly the screen that precedes the live bytes it then receives
//! (the first attach gets the output so far verbatim instead, while it is small).
//! Children are reaped by the exec reaper (`Procs::spawn_tracked`), which hands over the status.

use crate::exec::Procs;
use bytes::Bytes;
use devbox_protocol::pty::{self, PtyAttachQuery, PtyControl, PtyInfo, PtyOpen, PtyStatus};
use devbox_protocol::{AgentError, BodyError, ChannelBody, ErrorKind, Exit, Frame, FrameKind};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use std::collections::HashMap;
use std::num::NonZeroU16;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, LazyLock, Mutex, Once};
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot, watch};

type Body = BoxBody<Bytes, BodyError>;
type Tx = mpsc::Sender<Result<Bytes, BodyError>>;

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Each session holds a screen model and a process tree; a box needs a handful, not thousands.
const MAX_SESSIONS: usize = 32;
/// After the shell exits, output of processes that still hold the terminal is read this long.
const DRAIN_GRACE: Duration = Duration::from_millis(150);
/// A closed session's processes get SIGHUP, then SIGKILL after this long.
const HANGUP_GRACE: Duration = Duration::from_secs(3);
const SWEEP_EVERY: Duration = Duration::from_secs(15);
const READ_CHUNK: usize = 64 * 1024;
/// The screen redraw is sent in frames of at most this size (well below `MAX_FRAME_PAYLOAD`).
const REPLAY_CHUNK: usize = 1 << 20;
/// Output before the first attach is kept verbatim up to this much (see `State::unseen`).
const UNSEEN_CAP: usize = 256 << 10;

/// The agent's sessions by name. One registry per agent process, so a global: the HTTP service
/// reaches it without threading new state through every route.
static SESSIONS: LazyLock<Mutex<HashMap<String, Arc<Session>>>> = LazyLock::new(Default::default);
static SWEEPER: Once = Once::new();

struct Session {
    name: String,
    pid: i32,
    master: AsyncFd<OwnedFd>,
    idle_ttl: Duration,
    state: Mutex<State>,
}

struct Attachment {
    id: u64,
    tx: Tx,
    /// Dropped on detach: wakes the task that feeds this client's keystrokes.
    _stop: watch::Sender<()>,
}

struct State {
    screen: vt100::Parser,
    cols: u16,
    rows: u16,
    attached: Option<Attachment>,
    next_attach: u64,
    /// Since when no client is attached (idle TTL).
    idle_since: Instant,
    exit: Option<Exit>,
    closed: bool,
    /// Output from before the first attach, verbatim, while it fits in `UNSEEN_CAP`. The first
    /// client gets these bytes instead of a redraw: a quick command's output then reads as
    /// printed (scrollback intact) rather than as a cleared screen.
    unseen: Option<Vec<u8>>,
}

fn err(kind: ErrorKind, message: impl Into<String>) -> AgentError {
    AgentError { kind, message: message.into() }
}

fn bad(message: impl Into<String>) -> AgentError {
    err(ErrorKind::BadRequest, message)
}

fn io(what: &str, e: std::io::Error) -> AgentError {
    err(ErrorKind::Io, format!("{what}: {e}"))
}

fn no_session(name: &str) -> AgentError {
    err(ErrorKind::NotFound, format!("no terminal session {name:?}"))
}

fn nz(v: u16) -> NonZeroU16 {
    NonZeroU16::new(v).unwrap_or(NonZeroU16::MIN)
}

/// `/v1/pty…` requests.
pub async fn route(req: Request<Incoming>, procs: &Procs) -> Result<Response<Body>, AgentError> {
    let path = req.uri().path().to_string();
    if path == pty::PATH && req.method() == Method::POST {
        let open: PtyOpen = body_json(req).await?;
        return open_session(open, procs).map(|i| json(&i));
    }
    let rest = path.strip_prefix("/v1/pty/").unwrap_or_default();
    let (name, action) = rest.split_once('/').unwrap_or((rest, ""));
    match (req.method().clone(), action) {
        (Method::POST, "attach") => {
            let q: PtyAttachQuery = serde_urlencoded::from_str(req.uri().query().unwrap_or(""))
                .map_err(|e| bad(format!("bad query: {e}")))?;
            let name = name.to_string();
            attach(&name, q, req.into_body())
        }
        (Method::POST, "control") => {
            let name = name.to_string();
            let c: PtyControl = body_json(req).await?;
            control(&name, c).map(|i| json(&i))
        }
        _ => Err(err(ErrorKind::NotFound, format!("no route {path}"))),
    }
}

fn json<T: serde::Serialize>(v: &T) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(v).expect("serializable"))).map_err(|n| match n {}).boxed())
        .expect("valid response")
}

async fn body_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, AgentError> {
    let bytes =
        Limited::new(req.into_body(), 64 << 10).collect().await.map_err(|e| bad(format!("read body: {e}")))?.to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| bad(format!("bad json: {e}")))
}

fn lookup(name: &str) -> Result<Arc<Session>, AgentError> {
    SESSIONS.lock().unwrap().get(name).cloned().ok_or_else(|| no_session(name))
}

/// Forget `s` unless its name already belongs to a newer session.
fn remove(s: &Arc<Session>) {
    let mut map = SESSIONS.lock().unwrap();
    if map.get(&s.name).is_some_and(|cur| Arc::ptr_eq(cur, s)) {
        map.remove(&s.name);
    }
}

fn open_session(req: PtyOpen, procs: &Procs) -> Result<PtyInfo, AgentError> {
    if !pty::valid_session_name(&req.name) {
        return Err(bad("session name must be 1-256 letters, digits, '-' or '_'"));
    }
    if !pty::valid_size(req.cols, req.rows) {
        return Err(bad(format!(
            "terminal size must be 1-{} columns and 1-{} rows",
            pty::PTY_MAX_COLS,
            pty::PTY_MAX_ROWS
        )));
    }
    let mut map = SESSIONS.lock().unwrap();
    if let Some(s) = map.get(&req.name) {
        return Ok(s.info(false));
    }
    if map.len() >= MAX_SESSIONS {
        return Err(err(ErrorKind::Conflict, format!("{MAX_SESSIONS} terminal sessions are open: close one first")));
    }
    let (session, exit_rx) = spawn(&req, procs)?;
    map.insert(req.name.clone(), session.clone());
    drop(map);
    SWEEPER.call_once(|| {
        tokio::spawn(async {
            loop {
                tokio::time::sleep(SWEEP_EVERY).await;
                sweep(Instant::now());
            }
        });
    });
    tokio::spawn(pump(session.clone(), exit_rx));
    Ok(session.info(true))
}

/// A pty pair, both ends close-on-exec from the start (no window in which another child
/// could inherit the master). The slave is opened through the master (`TIOCGPTPEER`), so no
/// path lookup in /dev/pts can be raced.
fn open_pty(cols: u16, rows: u16) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let last = std::io::Error::last_os_error;
    // SAFETY: plain syscalls on fds we own; every returned fd is wrapped at once.
    unsafe {
        let m = libc::open(c"/dev/ptmx".as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC | libc::O_NONBLOCK);
        if m < 0 {
            return Err(last());
        }
        let master = OwnedFd::from_raw_fd(m);
        let unlock: libc::c_int = 0;
        if libc::ioctl(m, libc::TIOCSPTLCK, &unlock) < 0 {
            return Err(last());
        }
        set_winsize(m, cols, rows)?;
        let s = libc::ioctl(m, libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if s < 0 {
            return Err(last());
        }
        Ok((master, OwnedFd::from_raw_fd(s)))
    }
}

fn set_winsize(fd: i32, cols: u16, rows: u16) -> std::io::Result<()> {
    let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer.
    if unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn spawn(req: &PtyOpen, procs: &Procs) -> Result<(Arc<Session>, oneshot::Receiver<Exit>), AgentError> {
    let (master, slave) = open_pty(req.cols, req.rows).map_err(|e| io("open a pseudo-terminal", e))?;
    let stdio = || slave.try_clone().map(Stdio::from).map_err(|e| io("dup pty", e));
    let mut cmd = Command::new("/bin/bash");
    match &req.command {
        Some(c) => cmd.arg("-lc").arg(c),
        None => cmd.arg("-l"),
    };
    let home = &req.user.home;
    let cwd = if std::path::Path::new(home).is_dir() { home.as_str() } else { "/" };
    cmd.env_clear()
        .env("HOME", home)
        .env("USER", &req.user.name)
        .env("LOGNAME", &req.user.name)
        .env("SHELL", "/bin/bash")
        .env("PATH", PATH)
        .env("LANG", "C.UTF-8")
        .env("TERM", "xterm-256color")
        .envs(req.env.iter().map(|(k, v)| (k, v)))
        .current_dir(cwd)
        .stdin(stdio()?)
        .stdout(stdio()?)
        .stderr(stdio()?);
    if req.user.uid != 0 || req.user.gid != 0 {
        cmd.uid(req.user.uid).gid(req.user.gid);
    }
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            // A session of its own with the terminal (now on fd 0) as controlling tty: job
            // control, ^C and hangups then work as on a real terminal.
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            crate::exec::reset_oom_score();
            Ok(())
        });
    }
    let (child, exit_rx) = procs.spawn_tracked(&mut cmd).map_err(|e| io("start bash", e))?;
    // The parent's copies of the slave must go, or the master never sees the terminal close.
    drop(cmd);
    drop(slave);
    // SAFETY: an OwnedFd stays open and keeps its number for as long as the AsyncFd owns it.
    let master = unsafe { AsyncFd::register(master) }.map_err(|e| io("register pty", e.into()))?;
    let now = Instant::now();
    let session = Arc::new(Session {
        name: req.name.clone(),
        pid: child.id() as i32,
        master,
        idle_ttl: Duration::from_secs(req.idle_ttl_seconds.unwrap_or(pty::PTY_IDLE_TTL_SECONDS).into()),
        state: Mutex::new(State {
            screen: vt100::Parser::new(nz(req.rows), nz(req.cols), 0),
            cols: req.cols,
            rows: req.rows,
            attached: None,
            next_attach: 0,
            idle_since: now,
            exit: None,
            closed: false,
            unseen: Some(Vec::new()),
        }),
    });
    Ok((session, exit_rx))
}

/// Read the terminal until the shell exited and its output is drained, then report the exit.
async fn pump(s: Arc<Session>, mut exit_rx: oneshot::Receiver<Exit>) {
    let mut buf = vec![0u8; READ_CHUNK];
    let mut exit: Option<Exit> = None;
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut open = true;
    while open {
        let grace = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = read_some(&s.master, &mut buf) => match r {
                // EIO: every slave fd is closed.
                Ok(0) | Err(_) => open = false,
                Ok(n) => s.output(&buf[..n]).await,
            },
            e = &mut exit_rx, if exit.is_none() => {
                exit = Some(e.unwrap_or(Exit { code: None, signal: None }));
                deadline = Some(tokio::time::Instant::now() + DRAIN_GRACE);
            },
            // A background job still holds the terminal: the session is over anyway.
            _ = grace => break,
        }
    }
    let exit = match exit {
        Some(e) => e,
        None => exit_rx.await.unwrap_or(Exit { code: None, signal: None }),
    };
    s.finish(exit).await;
}

async fn read_some(fd: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        let mut guard = fd.readable().await?;
        // SAFETY: read(2) into a buffer we own, bounded by its length.
        let r = guard.try_io(|f| match unsafe { libc::read(f.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } {
            n if n < 0 => Err(std::io::Error::last_os_error()),
            n => Ok(n as usize),
        });
        if let Ok(r) = r {
            return r;
        }
    }
}

async fn write_all(fd: &AsyncFd<OwnedFd>, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        let mut guard = fd.writable().await?;
        // SAFETY: write(2) from a slice we borrow, bounded by its length.
        let r = guard.try_io(|f| match unsafe { libc::write(f.as_raw_fd(), data.as_ptr().cast(), data.len()) } {
            n if n < 0 => Err(std::io::Error::last_os_error()),
            n => Ok(n as usize),
        });
        match r {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}

/// Bytes that redraw `screen` on a terminal: the right buffer (main or alternate), contents,
/// attributes, cursor and input modes (so vim's keypad and bracketed paste keep working).
fn redraw(screen: &vt100::Screen) -> Vec<u8> {
    let mut out = Vec::new();
    if screen.alternate_screen() {
        out.extend_from_slice(b"\x1b[?1049h");
    }
    out.extend_from_slice(screen.state_formatted().as_bytes());
    out
}

/// Processes whose session id is `sid`, from /proc (a closed terminal's jobs may sit in
/// process groups of their own).
fn session_members(sid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return vec![] };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| stat_session(&s)) == Some(sid)
        })
        .collect()
}

/// Field 6 (session) of /proc/PID/stat; the command name in field 2 may hold spaces and ')'.
fn stat_session(stat: &str) -> Option<i32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(3)?.parse().ok()
}

fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2); ESRCH (already gone) is fine.
    unsafe { libc::kill(pid, sig) };
}

impl Session {
    fn info(&self, created: bool) -> PtyInfo {
        let st = self.state.lock().unwrap();
        let status = if st.closed {
            PtyStatus::Closed
        } else if st.exit.is_some() {
            PtyStatus::Exited
        } else {
            PtyStatus::Running
        };
        PtyInfo {
            name: self.name.clone(),
            status,
            created,
            attached: st.attached.is_some(),
            cols: st.cols,
            rows: st.rows,
            idle_ttl_seconds: self.idle_ttl.as_secs() as u32,
            exit: st.exit,
        }
    }

    async fn output(&self, data: &[u8]) {
        let target = {
            let mut st = self.state.lock().unwrap();
            st.screen.process(data);
            if let Some(u) = &mut st.unseen {
                if u.len() + data.len() <= UNSEEN_CAP {
                    u.extend_from_slice(data);
                } else {
                    st.unseen = None;
                }
            }
            st.attached.as_ref().map(|a| (a.id, a.tx.clone()))
        };
        if let Some((id, tx)) = target {
            // Back-pressure: a slow client slows the program down, as a slow terminal would.
            let frame = Frame::new(FrameKind::Stdout, Bytes::copy_from_slice(data)).encode();
            if tx.send(Ok(frame)).await.is_err() {
                self.detach(id);
            }
        }
    }

    async fn finish(self: &Arc<Self>, exit: Exit) {
        let attached = {
            let mut st = self.state.lock().unwrap();
            st.exit = Some(exit);
            st.idle_since = Instant::now();
            st.attached.take()
        };
        if let Some(a) = attached {
            let _ = a.tx.send(Ok(Frame::json(FrameKind::Exit, &exit).encode())).await;
            // Delivered: the name is free again. Unattached, the session (screen and exit)
            // waits for the next attach or its idle TTL.
            remove(self);
        }
    }

    fn detach(&self, id: u64) {
        let mut st = self.state.lock().unwrap();
        if st.attached.as_ref().is_some_and(|a| a.id == id) {
            st.attached = None;
            st.idle_since = Instant::now();
        }
    }

    fn resize(&self, st: &mut State, cols: u16, rows: u16) -> Result<(), AgentError> {
        if !pty::valid_size(cols, rows) {
            return Err(bad(format!(
                "terminal size must be 1-{} columns and 1-{} rows",
                pty::PTY_MAX_COLS,
                pty::PTY_MAX_ROWS
            )));
        }
        if st.exit.is_some() || (st.cols, st.rows) == (cols, rows) {
            return Ok(());
        }
        // The kernel sends SIGWINCH to the foreground job, which redraws.
        set_winsize(self.master.as_raw_fd(), cols, rows).map_err(|e| io("resize", e))?;
        st.screen.set_size(nz(rows), nz(cols));
        (st.cols, st.rows) = (cols, rows);
        Ok(())
    }

    fn signal(&self, sig: i32) -> Result<(), AgentError> {
        if !(1..=64).contains(&sig) {
            return Err(bad(format!("invalid signal number {sig}")));
        }
        if self.state.lock().unwrap().exit.is_some() {
            return Ok(());
        }
        // Like a key press: to the terminal's foreground job, else the shell's group.
        // SAFETY: tcgetpgrp on our master fd.
        let pgrp = unsafe { libc::tcgetpgrp(self.master.as_raw_fd()) };
        kill(if pgrp > 0 { -pgrp } else { -self.pid }, sig);
        Ok(())
    }

    /// Hang up every process of the terminal's session; the name is free at once.
    fn close(self: &Arc<Self>) {
        let running = {
            let mut st = self.state.lock().unwrap();
            st.closed = true;
            st.exit.is_none()
        };
        remove(self);
        if !running {
            return;
        }
        for pid in session_members(self.pid) {
            kill(pid, libc::SIGHUP);
            kill(pid, libc::SIGCONT);
        }
        let s = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(HANGUP_GRACE).await;
            if s.state.lock().unwrap().exit.is_none() {
                for pid in session_members(s.pid) {
                    kill(pid, libc::SIGKILL);
                }
            }
        });
    }

    fn idle_expired(&self, now: Instant) -> bool {
        let st = self.state.lock().unwrap();
        st.attached.is_none() && now.saturating_duration_since(st.idle_since) >= self.idle_ttl
    }
}

fn sweep(now: Instant) {
    let expired: Vec<Arc<Session>> =
        SESSIONS.lock().unwrap().values().filter(|s| s.idle_expired(now)).cloned().collect();
    for s in expired {
        s.close();
    }
}

/// Attach a client: the response body gets the redraw, then live output, then the exit.
fn attach<B>(name: &str, q: PtyAttachQuery, input: B) -> Result<Response<Body>, AgentError>
where
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
{
    let s = lookup(name)?;
    let (tx, body) = ChannelBody::new(64);
    let (stop_tx, stop_rx) = watch::channel(());
    let id = {
        let mut st = s.state.lock().unwrap();
        if st.attached.is_some() {
            return Err(err(ErrorKind::Conflict, format!("terminal session {name:?} already has a client attached")));
        }
        let (cols, rows) = (q.cols.unwrap_or(st.cols), q.rows.unwrap_or(st.rows));
        s.resize(&mut st, cols, rows)?;
        // The channel is new and deeper than the redraw's frames: try_send cannot fail.
        let replay = st.unseen.take().unwrap_or_else(|| redraw(st.screen.screen()));
        for chunk in replay.chunks(REPLAY_CHUNK) {
            let _ = tx.try_send(Ok(Frame::new(FrameKind::Stdout, Bytes::copy_from_slice(chunk)).encode()));
        }
        match st.exit {
            Some(exit) => {
                let _ = tx.try_send(Ok(Frame::json(FrameKind::Exit, &exit).encode()));
                None
            }
            None => {
                st.next_attach += 1;
                let id = st.next_attach;
                st.attached = Some(Attachment { id, tx: tx.clone(), _stop: stop_tx });
                Some(id)
            }
        }
    };
    match id {
        Some(id) => {
            tokio::spawn(feed_input(s, id, input, tx, stop_rx));
        }
        // Its exit is now delivered.
        None => remove(&s),
    }
    Ok(Response::builder()
        .header("content-type", "application/vnd.devbox.frames")
        .body(body.boxed())
        .expect("valid response"))
}

/// Keystrokes from the client to the terminal, until the client goes (end of its request
/// body, or its response stream reset) or the attachment ends (detach, exit).
async fn feed_input<B>(s: Arc<Session>, id: u64, mut input: B, tx: Tx, mut stop: watch::Receiver<()>)
where
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
{
    loop {
        let data = tokio::select! {
            f = input.frame() => match f {
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) => d,
                    Err(_) => continue,
                },
                _ => break,
            },
            _ = tx.closed() => break,
            _ = stop.changed() => break,
        };
        let written = tokio::select! {
            r = write_all(&s.master, &data) => r.is_ok(),
            _ = stop.changed() => false,
        };
        if !written {
            break;
        }
    }
    drop(tx);
    s.detach(id);
}

fn control(name: &str, c: PtyControl) -> Result<PtyInfo, AgentError> {
    let s = lookup(name)?;
    match c {
        PtyControl::Resize { cols, rows } => {
            let mut st = s.state.lock().unwrap();
            s.resize(&mut st, cols, rows)?;
        }
        PtyControl::Signal { signal } => s.signal(signal)?,
        PtyControl::Close => s.close(),
    }
    Ok(s.info(false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use devbox_protocol::{FrameDecoder, UserSpec};

    #[test]
    fn redraw_reproduces_the_screen() {
        let mut p = vt100::Parser::new(nz(5), nz(20), 0);
        p.process(b"hello\r\n\x1b[1;31mred\x1b[0m world\r\n$ ");
        let mut copy = vt100::Parser::new(nz(5), nz(20), 0);
        copy.process(b"stale text that must vanish");
        copy.process(&redraw(p.screen()));
        assert_eq!(copy.screen().contents(), p.screen().contents());
        assert_eq!(copy.screen().cursor_position(), (2, 2));
        assert!(copy.screen().cell(1, 0).unwrap().fgcolor() == vt100::Color::Idx(1));

        // A full-screen program (vim) lives on the alternate screen.
        p.process(b"\x1b[?1049h\x1b[Hvim here");
        let mut copy = vt100::Parser::new(nz(5), nz(20), 0);
        copy.process(&redraw(p.screen()));
        assert!(copy.screen().alternate_screen());
        assert!(copy.screen().contents().starts_with("vim here"));
    }

    #[test]
    fn stat_session_field() {
        assert_eq!(stat_session("42 (bash) S 1 42 40 34816 42 4194560 0"), Some(40));
        assert_eq!(stat_session("7 (a) b) (c) R 1 7 99 0"), Some(99));
        assert_eq!(stat_session("garbage"), None);
    }

    async fn frames(body: &mut Body, dec: &mut FrameDecoder, until: impl Fn(&[u8], bool) -> bool) -> Vec<u8> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            while let Some(f) = dec.next_frame().unwrap() {
                let exit = f.kind == FrameKind::Exit;
                if exit {
                    out.extend_from_slice(b"<EXIT:");
                }
                out.extend_from_slice(&f.payload);
                if until(&out, exit) {
                    return out;
                }
            }
            let f = tokio::time::timeout_at(deadline, body.frame()).await;
            match f {
                Ok(Some(Ok(f))) => dec.push(&f.into_data().unwrap()),
                other => {
                    panic!("stream ended or timed out ({}) with {:?}", other.is_ok(), String::from_utf8_lossy(&out))
                }
            }
        }
    }

    /// The whole life of a session on a real pty in this (root) test process: create, attach,
    /// type, detach, reattach with the screen intact, resize, conflict, exit code. One test,
    /// because the reaper waits for any child of the process.
    #[test]
    fn session_lifecycle() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let procs = Procs::default();
            procs.start_reaper().unwrap();
            let user = UserSpec { name: "root".into(), uid: 0, gid: 0, home: "/tmp".into() };
            let open = PtyOpen {
                name: "t1".into(),
                cols: 80,
                rows: 24,
                user,
                env: vec![("PS1".into(), "PROMPT> ".into())],
                command: Some("export PS1='PROMPT> '; exec bash --norc -i".into()),
                idle_ttl_seconds: Some(60),
            };
            let info = open_session(open.clone(), &procs).unwrap();
            assert!(info.created && !info.attached && info.status == PtyStatus::Running);
            assert!(!open_session(open.clone(), &procs).unwrap().created);

            let (in_tx, in_body) = ChannelBody::new(8);
            let mut out = attach("t1", PtyAttachQuery::default(), in_body).unwrap().into_body();
            let mut dec = FrameDecoder::default();
            let first = frames(&mut out, &mut dec, |o, _| o.windows(8).any(|w| w == b"PROMPT> ")).await;
            assert!(!first.windows(6).any(|w| w == b"\x1b[H\x1b[J"), "the first attach gets output, not a redraw");
            let (in2, body2) = ChannelBody::new(1);
            let e = attach("t1", PtyAttachQuery::default(), body2).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Conflict);
            drop(in2);

            in_tx.send(Ok(Bytes::from_static(b"echo marker-$((40+2))\n"))).await.unwrap();
            frames(&mut out, &mut dec, |o, _| String::from_utf8_lossy(o).contains("marker-42")).await;
            // Detach by ending the input; the output stream then ends.
            drop(in_tx);
            while out.frame().await.is_some() {}
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(!lookup("t1").unwrap().info(false).attached);

            // Reattach at a new size: the redraw shows the earlier output.
            let (in_tx, in_body) = ChannelBody::new(8);
            let mut out =
                attach("t1", PtyAttachQuery { cols: Some(100), rows: Some(30) }, in_body).unwrap().into_body();
            let mut dec = FrameDecoder::default();
            frames(&mut out, &mut dec, |o, _| String::from_utf8_lossy(o).contains("marker-42")).await;
            in_tx.send(Ok(Bytes::from_static(b"stty size\n"))).await.unwrap();
            frames(&mut out, &mut dec, |o, _| String::from_utf8_lossy(o).contains("30 100")).await;
            let info = control("t1", PtyControl::Resize { cols: 0, rows: 5 }).unwrap_err();
            assert_eq!(info.kind, ErrorKind::BadRequest);

            in_tx.send(Ok(Bytes::from_static(b"exit 3\n"))).await.unwrap();
            let o = frames(&mut out, &mut dec, |_, exit| exit).await;
            let tail = String::from_utf8_lossy(&o);
            let exit: Exit = serde_json::from_str(tail.rsplit("<EXIT:").next().unwrap()).unwrap();
            assert_eq!(exit.status(), 3);
            assert!(out.frame().await.is_none(), "the stream ends after the exit");
            assert!(lookup("t1").is_err(), "a delivered exit frees the name");

            // A detached session past its idle TTL is hung up by the sweeper.
            let idle = PtyOpen { name: "t2".into(), command: None, idle_ttl_seconds: Some(0), ..open };
            open_session(idle, &procs).unwrap();
            let s = lookup("t2").unwrap();
            sweep(Instant::now());
            assert!(lookup("t2").is_err(), "closed sessions leave the map at once");
            let deadline = Instant::now() + Duration::from_secs(10);
            while s.state.lock().unwrap().exit.is_none() {
                assert!(Instant::now() < deadline, "the idle shell was not hung up");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(s.info(false).status, PtyStatus::Closed);
        });
    }
}
