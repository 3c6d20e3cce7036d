//! Interactive terminals (PTY sessions) kept by the agent.
//!
//! A session is a login shell (or one command) on a pseudo-terminal, named by the client. It
//! outlives its connections: the agent keeps a screen model, so an attach first receives the
//! current screen, then live output. At most one attachment at a time.
//!
//! `POST /v1/pty` ([`PtyOpen`]) creates a session or returns the existing one ([`PtyInfo`]).
//! `POST /v1/pty/{name}/attach?cols=&rows=` ([`PtyAttachQuery`]) is full duplex: the request
//! body is keyboard input, the response body is a stream of frames — `Stdout` (terminal bytes:
//! first what is on screen — the output so far on a session's first attach while it is small,
//! else a redraw of the screen — then live output), then one `Exit` when the session's process
//! ended. The attachment ends when the host ends its request body or resets the stream.
//! `POST /v1/pty/{name}/control` ([`PtyControl`]) resizes, signals or closes; answers `PtyInfo`.

use crate::{Exit, UserSpec};
use serde::{Deserialize, Serialize};

/// A detached session is closed after this long without a client.
pub const PTY_IDLE_TTL_SECONDS: u32 = 3600;
/// Bounds of a terminal size; the screen model costs memory per cell.
pub const PTY_MAX_COLS: u16 = 1000;
pub const PTY_MAX_ROWS: u16 = 500;
pub const PTY_DEFAULT_COLS: u16 = 80;
pub const PTY_DEFAULT_ROWS: u16 = 24;

/// `POST` creates or reports a session.
pub const PATH: &str = "/v1/pty";

/// `/v1/pty/{name}/attach` and `/v1/pty/{name}/control`.
pub fn path(name: &str, action: &str) -> String {
    format!("{PATH}/{name}/{action}")
}

/// Session names are 1-256 letters, digits, `-` or `_` (they appear in URL paths unescaped).
pub fn valid_session_name(name: &str) -> bool {
    (1..=256).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

pub fn valid_size(cols: u16, rows: u16) -> bool {
    (1..=PTY_MAX_COLS).contains(&cols) && (1..=PTY_MAX_ROWS).contains(&rows)
}

/// `POST /v1/pty`: create the session `name` unless it exists (then only report it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PtyOpen {
    pub name: String,
    pub cols: u16,
    pub rows: u16,
    pub user: UserSpec,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Run `bash -lc <command>` instead of an interactive `bash -l`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Overrides [`PTY_IDLE_TTL_SECONDS`] for this session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_ttl_seconds: Option<u32>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PtyStatus {
    /// The process runs.
    Running,
    /// The process ended; the session stays until an attach delivered its exit (or it idles out).
    Exited,
    /// Closed by a `close` control; the process is being hung up.
    Closed,
}

impl PtyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PtyStatus::Running => "running",
            PtyStatus::Exited => "exited",
            PtyStatus::Closed => "closed",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PtyInfo {
    pub name: String,
    pub status: PtyStatus,
    /// This request created the session.
    pub created: bool,
    /// A client is attached right now.
    pub attached: bool,
    pub cols: u16,
    pub rows: u16,
    pub idle_ttl_seconds: u32,
    /// Set once the process ended.
    #[serde(default)]
    pub exit: Option<Exit>,
}

/// Query of `POST /v1/pty/{name}/attach`: the attaching client's size (resizes the session).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct PtyAttachQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cols: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u16>,
}

/// Body of `POST /v1/pty/{name}/control`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum PtyControl {
    Resize {
        cols: u16,
        rows: u16,
    },
    /// Sent to the terminal's foreground process group, as the keyboard would.
    Signal {
        signal: i32,
    },
    /// Hang up the session (SIGHUP, SIGKILL if it lingers) and forget its name at once.
    Close,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_shapes_are_frozen() {
        assert_eq!(
            serde_json::to_string(&PtyControl::Resize { cols: 80, rows: 24 }).unwrap(),
            r#"{"action":"resize","cols":80,"rows":24}"#
        );
        assert_eq!(
            serde_json::to_string(&PtyControl::Signal { signal: 2 }).unwrap(),
            r#"{"action":"signal","signal":2}"#
        );
        assert_eq!(serde_json::to_string(&PtyControl::Close).unwrap(), r#"{"action":"close"}"#);
        let open = PtyOpen {
            name: "s".into(),
            cols: 80,
            rows: 24,
            user: UserSpec::root(),
            env: vec![],
            command: None,
            idle_ttl_seconds: None,
        };
        assert_eq!(
            serde_json::to_string(&open).unwrap(),
            r#"{"name":"s","cols":80,"rows":24,"user":{"name":"root","uid":0,"gid":0,"home":"/root"},"env":[]}"#
        );
        let info: PtyInfo = serde_json::from_str(
            r#"{"name":"s","status":"exited","created":false,"attached":false,"cols":80,"rows":24,"idle_ttl_seconds":60,"exit":{"code":3,"signal":null}}"#,
        )
        .unwrap();
        assert_eq!(info.status, PtyStatus::Exited);
        assert_eq!(info.exit.map(|e| e.status()), Some(3));
    }

    #[test]
    fn names_and_sizes() {
        assert!(valid_session_name("a"));
        assert!(valid_session_name("dbx_1-AZ"));
        assert!(valid_session_name(&"x".repeat(256)));
        assert!(!valid_session_name(""));
        assert!(!valid_session_name(&"x".repeat(257)));
        for bad in ["a b", "a/b", "..", "a.b", "é"] {
            assert!(!valid_session_name(bad), "{bad:?}");
        }
        assert!(valid_size(1, 1) && valid_size(PTY_MAX_COLS, PTY_MAX_ROWS));
        assert!(!valid_size(0, 24) && !valid_size(80, 0) && !valid_size(PTY_MAX_COLS + 1, 24));
    }
}
