//! The in-box agent, embedded so `devboxd` is one self-contained file.

/// The static `devbox-agent` executable.
pub static AGENT: &[u8] = include_bytes!(env!("DEVBOX_AGENT_PATH"));
