//! devbox-agent: PID 1 inside a devbox.
//!
//! `devbox-agent container-init BOOT.json` — the in-box half of the container runtime: enter
//! fresh namespaces, build the root filesystem, harden the process, then serve.
//! `devbox-agent serve PATH` — serve on a unix socket path in an already isolated system (VMs).

mod container;
mod exec;
mod files;
mod harden;
mod pty;
mod server;
mod setup;

use std::os::unix::net::UnixListener;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.get(1).map(String::as_str) {
        Some("container-init") if args.len() == 3 => container::init(&args[2]),
        Some("serve") if args.len() == 3 => {
            UnixListener::bind(&args[2]).map_err(|e| format!("bind {}: {e}", args[2])).and_then(server::run)
        }
        Some("--version") => {
            println!("devbox-agent {} protocol {}", env!("CARGO_PKG_VERSION"), devbox_protocol::PROTOCOL_VERSION);
            Ok(())
        }
        _ => Err("usage: devbox-agent container-init BOOT.json | serve SOCKET".to_string()),
    };
    if let Err(e) = result {
        eprintln!("devbox-agent: {e}");
        std::process::exit(1);
    }
}
