//! Make the box ready for its user: account, home directory and (optionally) passwordless sudo.
//! Edits the account files directly: the image needs no `useradd`, and it is idempotent.

use devbox_protocol::{AgentError, ErrorKind, SetupRequest};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::Path;

fn io(what: &str, e: std::io::Error) -> AgentError {
    AgentError { kind: ErrorKind::Io, message: format!("{what}: {e}") }
}

fn append(path: &str, line: &str) -> Result<(), AgentError> {
    let mut f = fs::OpenOptions::new().append(true).create(true).open(path).map_err(|e| io(path, e))?;
    f.write_all(line.as_bytes()).map_err(|e| io(path, e))
}

fn has_entry(path: &str, name: &str) -> bool {
    fs::read_to_string(path).map(|s| s.lines().any(|l| l.split(':').next() == Some(name))).unwrap_or(false)
}

pub fn setup(req: &SetupRequest) -> Result<(), AgentError> {
    let u = &req.user;
    let bad = |m: &str| AgentError { kind: ErrorKind::BadRequest, message: m.to_string() };
    if u.name.is_empty() || !u.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        return Err(bad("user name must be letters, digits, '_' or '-'"));
    }
    if u.uid == 0 {
        return Ok(());
    }
    if !has_entry("/etc/group", &u.name) {
        append("/etc/group", &format!("{}:x:{}:\n", u.name, u.gid))?;
    }
    if !has_entry("/etc/passwd", &u.name) {
        append("/etc/passwd", &format!("{}:x:{}:{}::{}:/bin/bash\n", u.name, u.uid, u.gid, u.home))?;
        if Path::new("/etc/shadow").exists() {
            append("/etc/shadow", &format!("{}:*:19000:0:99999:7:::\n", u.name))?;
        }
    }
    let home = Path::new(&u.home);
    if !home.exists() {
        fs::create_dir_all(home).map_err(|e| io("create home", e))?;
        if let Ok(entries) = fs::read_dir("/etc/skel") {
            for e in entries.flatten() {
                if e.path().is_file() {
                    let dst = home.join(e.file_name());
                    let _ = fs::copy(e.path(), &dst);
                    let _ = chown(&dst, Some(u.uid), Some(u.gid));
                }
            }
        }
        chown(home, Some(u.uid), Some(u.gid)).map_err(|e| io("chown home", e))?;
    }
    if req.sudo && Path::new("/etc/sudoers.d").is_dir() {
        let path = format!("/etc/sudoers.d/devbox-{}", u.name);
        if !Path::new(&path).exists() {
            fs::write(&path, format!("{} ALL=(ALL) NOPASSWD:ALL\n", u.name)).map_err(|e| io(&path, e))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o440)).map_err(|e| io(&path, e))?;
        }
    }
    Ok(())
}
