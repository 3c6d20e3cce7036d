//! `devboxd shell` and `devboxd exec`: a terminal client of a devboxd server, over the same
//! PTY protocol as Runloop's (create_pty_tunnel, `GET /pty/{session}`, WebSocket attach).
//!
//! The local terminal goes raw for the session (restored on every way out), SIGWINCH becomes
//! a `resize` control, and the remote shell's exit code (from the WebSocket close reason
//! `{"exit_code": N}`) becomes ours. Our own failures exit 255, as ssh's do.

use bytes::Bytes;
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use serde_json::{json, Value};
use std::io::{IsTerminal, Read, Write};
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};

/// Exit code for failures of the client itself (connection, protocol), as ssh uses.
pub const CLIENT_FAILURE: i32 = 255;

#[derive(Args)]
pub struct Conn {
    /// Base URL of the server (plain http).
    #[arg(long, env = "RUNLOOP_BASE_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// API key of the tenant that owns the devbox.
    #[arg(long, env = "RUNLOOP_API_KEY", hide_env_values = true)]
    pub api_key: String,
}

#[derive(Args)]
pub struct ShellArgs {
    /// The devbox id.
    pub devbox: String,
    #[command(flatten)]
    pub conn: Conn,
    /// Attach to this named session (created if missing), e.g. to resume after a dropped
    /// connection; the default is a new session.
    #[arg(long)]
    pub session: Option<String>,
}

#[derive(Args)]
pub struct ExecArgs {
    /// The devbox id.
    pub devbox: String,
    #[command(flatten)]
    pub conn: Conn,
    /// Run in a terminal even when stdin or stdout is not one.
    #[arg(short = 't', long, conflicts_with = "no_tty")]
    pub tty: bool,
    /// Never use a terminal: stdout and stderr stay apart, stdin is not forwarded.
    #[arg(short = 'T', long)]
    pub no_tty: bool,
    /// The command. Words are joined with spaces and run by `bash -lc`, as ssh does.
    #[arg(last = true, required = true, num_args = 1..)]
    pub command: Vec<String>,
}

/// Print the error (if any) and exit with the code.
pub fn exit_with(r: Result<i32, String>) -> ! {
    match r {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("devboxd: {e}");
            std::process::exit(CLIENT_FAILURE)
        }
    }
}

pub async fn shell(a: ShellArgs) -> Result<i32, String> {
    let api = Api::new(&a.conn)?;
    let session = match a.session {
        Some(s) => s,
        None => format!("shell-{}", random_hex(6)?),
    };
    api.terminal(&a.devbox, &session, None).await
}

pub async fn exec(a: ExecArgs) -> Result<i32, String> {
    let api = Api::new(&a.conn)?;
    let command = a.command.join(" ");
    let tty = a.tty || (!a.no_tty && std::io::stdin().is_terminal() && std::io::stdout().is_terminal());
    if tty {
        let session = format!("exec-{}", random_hex(6)?);
        api.terminal(&a.devbox, &session, Some(&command)).await
    } else {
        api.exec_plain(&a.devbox, &command).await
    }
}

fn random_hex(n: usize) -> Result<String, String> {
    let mut raw = vec![0u8; n];
    getrandom::fill(&mut raw).map_err(|e| format!("random: {e}"))?;
    Ok(raw.iter().map(|b| format!("{b:02x}")).collect())
}

/// The local terminal's size (cols, rows); 80x24 when there is none.
fn term_size() -> (u16, u16) {
    for fd in [libc::STDOUT_FILENO, libc::STDIN_FILENO] {
        let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCGWINSZ writes one winsize into the pointer.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_col > 0 && ws.ws_row > 0 {
            return (ws.ws_col, ws.ws_row);
        }
    }
    (80, 24)
}

/// Raw mode on stdin while alive; the saved settings come back on drop (also on an error
/// path or a panic, which unwinds).
struct RawMode(nix::sys::termios::Termios);

impl RawMode {
    fn enable() -> Result<Option<RawMode>, String> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Ok(None);
        }
        let saved = tcgetattr(&stdin).map_err(|e| format!("read terminal settings: {e}"))?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).map_err(|e| format!("raw terminal: {e}"))?;
        Ok(Some(RawMode(saved)))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSANOW, &self.0);
    }
}

fn write_out(mut w: impl Write, data: &[u8]) -> Result<(), String> {
    w.write_all(data).and_then(|()| w.flush()).map_err(|e| format!("write output: {e}"))
}

/// The exit code in a close frame from the server, or why there is none.
fn exit_code(frame: Option<&CloseFrame>) -> Result<i32, String> {
    let Some(f) = frame else { return Err("the server closed the terminal without an exit status".into()) };
    serde_json::from_str::<Value>(f.reason.as_str())
        .ok()
        .and_then(|v| v["exit_code"].as_i64())
        .map(|c| c as i32)
        .ok_or_else(|| format!("the server closed the terminal ({}: {})", u16::from(f.code), f.reason.as_str()))
}

#[derive(Clone)]
struct Api {
    client: Client<HttpConnector, Full<Bytes>>,
    /// `http://host:port`, no trailing slash.
    base: String,
    key: String,
}

impl Api {
    fn new(c: &Conn) -> Result<Api, String> {
        let base = c.url.trim_end_matches('/').to_string();
        if !base.starts_with("http://") {
            return Err(format!("--url must be an http:// URL (devboxd serves plain HTTP), got {base:?}"));
        }
        if c.api_key.is_empty() {
            return Err("an API key is needed: --api-key or RUNLOOP_API_KEY".into());
        }
        let client = Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
        Ok(Api { client, base, key: c.api_key.clone() })
    }

    fn request(&self, method: &str, path: &str, token: &str, body: Option<&Value>) -> hyper::Request<Full<Bytes>> {
        hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(Full::new(body.map(|b| Bytes::from(b.to_string())).unwrap_or_default()))
            .expect("valid request")
    }

    /// A JSON call; non-2xx answers become an error naming the server's message.
    async fn call(&self, method: &str, path: &str, token: &str, body: Option<Value>) -> Result<Value, String> {
        let (status, v) = self.call_status(method, path, token, body).await?;
        if !(200..300).contains(&status) {
            let msg = v["error"]["message"].as_str().map(String::from).unwrap_or_else(|| v.to_string());
            return Err(format!("{method} {path}: HTTP {status}: {msg}"));
        }
        Ok(v)
    }

    async fn call_status(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value), String> {
        let resp = self
            .client
            .request(self.request(method, path, token, body.as_ref()))
            .await
            .map_err(|e| format!("{}: {e}", self.base))?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.map_err(|e| format!("{path}: {e}"))?.to_bytes();
        Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
    }

    /// Create (or join) a PTY session, attach, and run the local terminal against it until
    /// the remote process exits. Returns its exit code.
    async fn terminal(&self, devbox: &str, session: &str, command: Option<&str>) -> Result<i32, String> {
        let tunnel = self.call("POST", &format!("/v1/devboxes/{devbox}/create_pty_tunnel"), &self.key, None).await?;
        let token = tunnel["auth_token"].as_str().ok_or("create_pty_tunnel gave no auth_token")?.to_string();
        let (cols, rows) = term_size();
        let mut q = vec![("cols", cols.to_string()), ("rows", rows.to_string())];
        if let Some(c) = command {
            q.push(("command", c.to_string()));
        }
        let q = serde_urlencoded::to_string(q).map_err(|e| e.to_string())?;
        let info = self.call("GET", &format!("/pty/{session}?{q}"), &token, None).await?;
        let connect = info["connect_url"].as_str().ok_or("the server gave no connect_url")?;

        let url = format!("ws://{}{connect}", self.base.trim_start_matches("http://"));
        let mut req = url.as_str().into_client_request().map_err(|e| format!("{url}: {e}"))?;
        req.headers_mut().insert("authorization", format!("Bearer {token}").parse().expect("header value"));
        let (ws, _) = tokio_tungstenite::connect_async(req).await.map_err(|e| match e {
            tungstenite::Error::Http(resp) => {
                let body = resp.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default().to_string();
                let msg = serde_json::from_str::<Value>(&body)
                    .ok()
                    .and_then(|v| v["error"]["message"].as_str().map(String::from))
                    .unwrap_or(body);
                format!("attach to session {session}: HTTP {}: {msg}", resp.status().as_u16())
            }
            e => format!("attach to session {session}: {e}"),
        })?;
        let (mut sink, mut stream) = ws.split();

        // Keystrokes: a plain thread, because a blocking read of fd 0 cannot be cancelled and
        // must not hold up the runtime; the process exits under it.
        let (in_tx, mut in_rx) = mpsc::channel::<Vec<u8>>(32);
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            let mut stdin = std::io::stdin().lock();
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if in_tx.blocking_send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        // Resizes go out in order, the newest size winning when they come fast.
        let (size_tx, mut size_rx) = watch::channel((cols, rows));
        let (api, tok, name) = (self.clone(), token.clone(), session.to_string());
        tokio::spawn(async move {
            while size_rx.changed().await.is_ok() {
                let (cols, rows) = *size_rx.borrow_and_update();
                let body = json!({ "action": "resize", "cols": cols, "rows": rows });
                let _ = api.call("POST", &format!("/pty/{name}/control"), &tok, Some(body)).await;
            }
        });
        let mut winch = signal(SignalKind::window_change()).map_err(|e| e.to_string())?;
        let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;

        let raw = RawMode::enable()?;
        let mut stdin_open = true;
        let result = loop {
            tokio::select! {
                m = stream.next() => match m {
                    Some(Ok(Message::Binary(b))) => write_out(std::io::stdout().lock(), &b)?,
                    Some(Ok(Message::Text(t))) => write_out(std::io::stdout().lock(), t.as_bytes())?,
                    Some(Ok(Message::Close(f))) => break exit_code(f.as_ref()),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break Err(format!("connection lost: {e}")),
                    None => break Err("connection closed".into()),
                },
                d = in_rx.recv(), if stdin_open => match d {
                    Some(d) => {
                        if let Err(e) = sink.send(Message::Binary(d.into())).await {
                            break Err(format!("connection lost: {e}"));
                        }
                    }
                    // End of input (not a terminal): the remote side decides when it is done.
                    None => stdin_open = false,
                },
                _ = winch.recv() => {
                    size_tx.send_replace(term_size());
                }
                // Our terminal went away or we were told to stop: the session stays on the
                // server (reattach with --session).
                _ = hup.recv() => break Ok(128 + libc::SIGHUP),
                _ = term.recv() => break Ok(128 + libc::SIGTERM),
            }
        };
        drop(raw);
        // Answer the server's close (or send ours), briefly.
        let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
        result.map_err(|e| format!("{e}; the session lives on for a while: devboxd shell {devbox} --session {session}"))
    }

    /// A command through the execution API: output streamed as it comes, stdout and stderr
    /// apart, exit status at the end.
    async fn exec_plain(&self, devbox: &str, command: &str) -> Result<i32, String> {
        let body = json!({ "command": command });
        let v = self.call("POST", &format!("/v1/devboxes/{devbox}/execute_async"), &self.key, Some(body)).await?;
        let eid = v["execution_id"].as_str().ok_or("execute_async gave no execution_id")?.to_string();
        let base = format!("/v1/devboxes/{devbox}/executions/{eid}");
        let out = tokio::spawn({
            let (api, base) = (self.clone(), base.clone());
            async move { api.follow(&format!("{base}/stream_stdout_updates"), false).await }
        });
        let err = tokio::spawn({
            let (api, base) = (self.clone(), base.clone());
            async move { api.follow(&format!("{base}/stream_stderr_updates"), true).await }
        });
        out.await.map_err(|e| e.to_string())??;
        err.await.map_err(|e| e.to_string())??;
        loop {
            let body = json!({ "statuses": ["completed"], "timeout_seconds": 25 });
            let (status, v) =
                self.call_status("POST", &format!("{base}/wait_for_status"), &self.key, Some(body)).await?;
            match status {
                200 => return Ok(v["exit_status"].as_i64().unwrap_or(CLIENT_FAILURE.into()) as i32),
                408 => continue,
                _ => return Err(format!("wait for {eid}: HTTP {status}: {v}")),
            }
        }
    }

    /// Copy one output stream (server-sent events) to ours until the execution is done,
    /// reconnecting from the last offset when the server ends a long hold.
    async fn follow(&self, path: &str, stderr: bool) -> Result<(), String> {
        let mut offset: u64 = 0;
        loop {
            let resp = self
                .client
                .request(self.request("GET", &format!("{path}?offset={offset}"), &self.key, None))
                .await
                .map_err(|e| format!("{path}: {e}"))?;
            if !resp.status().is_success() {
                return Err(format!("{path}: HTTP {}", resp.status()));
            }
            let mut body = resp.into_body();
            let mut buf = Vec::new();
            let mut expired = false;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| format!("{path}: {e}"))?;
                let Ok(data) = frame.into_data() else { continue };
                buf.extend_from_slice(&data);
                while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
                    let event: Vec<u8> = buf.drain(..end + 2).collect();
                    let event = String::from_utf8_lossy(&event);
                    if event.lines().any(|l| l.starts_with("event: error")) {
                        expired = true;
                        continue;
                    }
                    for line in event.lines().filter_map(|l| l.strip_prefix("data: ")) {
                        let v: Value = serde_json::from_str(line).map_err(|e| format!("{path}: bad event: {e}"))?;
                        let text = v["output"].as_str().unwrap_or_default();
                        if stderr {
                            write_out(std::io::stderr().lock(), text.as_bytes())?;
                        } else {
                            write_out(std::io::stdout().lock(), text.as_bytes())?;
                        }
                        offset = v["offset"].as_u64().unwrap_or(offset);
                    }
                }
            }
            if !expired {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    #[test]
    fn exit_code_from_close_reason() {
        let frame =
            |code: u16, reason: &str| CloseFrame { code: CloseCode::from(code), reason: reason.to_string().into() };
        assert_eq!(exit_code(Some(&frame(1000, r#"{"status":"exited","exit_code":3}"#))), Ok(3));
        assert_eq!(exit_code(Some(&frame(1000, r#"{"status":"exited","exit_code":130}"#))), Ok(130));
        assert!(exit_code(Some(&frame(1011, "lost the terminal"))).unwrap_err().contains("1011"));
        assert!(exit_code(None).is_err());
    }
}
