//! Base images: a Debian root filesystem made with mmdebstrap, stored under the image dir and
//! reused across restarts. A build goes to a temporary directory and is renamed into place, so
//! an interrupted build never leaves a half image that looks complete.

use crate::{Result, RuntimeError};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub const DEFAULT_IMAGE: &str = "default";
const SUITE: &str = "bookworm";
/// What an agent expects to find in a box, beyond minbase.
const PACKAGES: &[&str] = &[
    "bash",
    "coreutils",
    "git",
    "curl",
    "ca-certificates",
    "python3",
    "procps",
    "sudo",
    "vim-tiny",
    "less",
    "xz-utils",
    "ncurses-bin",
];
const USER_HOOK: &str = "chroot \"$1\" sh -c 'groupadd -g 1000 user && useradd -m -u 1000 -g 1000 -s /bin/bash user \
     && echo \"user ALL=(ALL) NOPASSWD:ALL\" > /etc/sudoers.d/devbox-user && chmod 0440 /etc/sudoers.d/devbox-user'";

/// Bumped whenever the recipe changes, so stale images are rebuilt rather than reused.
const RECIPE_VERSION: &str = "3";
/// Debian's /etc/profile forks `id -u` on every login shell; bash knows $EUID already. This
/// halves the cost of `bash -lc`, which every execution pays (dash still falls back to id).
const PROFILE_HOOK: &str = "sed -i 's/$(id -u)/${EUID:-$(id -u)}/' \"$1/etc/profile\"";
/// People type `vim`; vim-tiny only installs `vi`.
const VIM_HOOK: &str = "ln -sf /usr/bin/vim.tiny \"$1/usr/local/bin/vim\"";

#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
}

impl ImageStore {
    pub fn new(dir: &Path) -> ImageStore {
        ImageStore { dir: dir.to_path_buf() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Each recipe version has its own directory: a rebuild never changes the lower layer
    /// under a running box (overlayfs forbids that).
    fn image_dir(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.v{RECIPE_VERSION}"))
    }

    pub fn is_built(&self, name: &str) -> bool {
        std::fs::read_to_string(self.image_dir(name).join(".complete")).is_ok_and(|v| v.trim() == RECIPE_VERSION)
    }

    /// The read-only root filesystem of a built image.
    pub fn rootfs(&self, name: &str) -> Result<PathBuf> {
        if !self.is_built(name) {
            return Err(RuntimeError::ImageMissing(name.to_string()));
        }
        Ok(self.image_dir(name).join("rootfs"))
    }

    /// Build the default image unless it exists. `progress` receives one line per step.
    pub fn build_default(&self, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
        if self.is_built(DEFAULT_IMAGE) {
            progress("image already built");
            return self.rootfs(DEFAULT_IMAGE);
        }
        if Command::new("mmdebstrap").arg("--version").output().is_err() {
            return Err(RuntimeError::ImageBuild(
                "mmdebstrap is not installed: run `apt-get install -y mmdebstrap` (or ./devbox up, which does)".into(),
            ));
        }
        let final_dir = self.image_dir(DEFAULT_IMAGE);
        let tmp = self.dir.join(format!(".{DEFAULT_IMAGE}.building-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| RuntimeError::io(format!("create {}", tmp.display()), e))?;
        let mirror = host_mirror();
        progress(&format!("mmdebstrap {SUITE} (minbase + {}) from {mirror}", PACKAGES.join(",")));
        let mut child = Command::new("mmdebstrap")
            .arg("--variant=minbase")
            .arg(format!("--include={}", PACKAGES.join(",")))
            .arg(format!("--customize-hook={USER_HOOK}"))
            .arg(format!("--customize-hook={PROFILE_HOOK}"))
            .arg(format!("--customize-hook={VIM_HOOK}"))
            .arg("--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/*.bin")
            .arg(SUITE)
            .arg(tmp.join("rootfs"))
            .arg(&mirror)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| RuntimeError::io("start mmdebstrap", e))?;
        let stderr = child.stderr.take().expect("piped");
        let mut tail = Vec::new();
        for line in std::io::BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            if tail.len() >= 20 {
                tail.remove(0);
            }
            tail.push(line.clone());
            progress(&line);
        }
        let status = child.wait().map_err(|e| RuntimeError::io("wait for mmdebstrap", e))?;
        if !status.success() {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(RuntimeError::ImageBuild(format!(
                "mmdebstrap failed ({status}); last output:\n{}\nCheck that the Debian mirror {mirror} is reachable.",
                tail.join("\n")
            )));
        }
        std::fs::write(tmp.join(".complete"), RECIPE_VERSION)
            .map_err(|e| RuntimeError::io("mark image complete", e))?;
        let _ = std::fs::remove_dir_all(&final_dir);
        std::fs::rename(&tmp, &final_dir).map_err(|e| RuntimeError::io("move image into place", e))?;
        progress("image ready");
        self.rootfs(DEFAULT_IMAGE)
    }
}

/// The Debian mirror the host's apt uses, so image builds work wherever apt does.
fn host_mirror() -> String {
    let mut texts = vec![std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default()];
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "sources" || x == "list") {
                texts.push(std::fs::read_to_string(p).unwrap_or_default());
            }
        }
    }
    for t in &texts {
        if let Some(m) = mirror_from(t) {
            return m;
        }
    }
    "http://deb.debian.org/debian".into()
}

/// First URI serving the `bookworm` suite, in one-line or deb822 format.
fn mirror_from(text: &str) -> Option<String> {
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.first() == Some(&"deb") {
            let rest: Vec<&str> = f[1..].iter().copied().filter(|w| !w.starts_with('[')).collect();
            if rest.len() >= 2 && rest[1] == SUITE {
                return Some(rest[0].to_string());
            }
        }
    }
    for stanza in text.split("\n\n") {
        let field = |name: &str| stanza.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()));
        if let (Some(uris), Some(suites)) = (field("URIs:"), field("Suites:")) {
            if suites.split_whitespace().any(|s| s == SUITE) {
                return uris.split_whitespace().next().map(String::from);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::mirror_from;

    #[test]
    fn finds_mirror_in_both_formats() {
        assert_eq!(
            mirror_from("deb [arch=amd64] http://m.example/debian bookworm main\n").as_deref(),
            Some("http://m.example/debian")
        );
        let deb822 = "Types: deb\nURIs: http://sec.example/debian-security\nSuites: bookworm-security\n\n\
                      Types: deb\nURIs: http://m.example/debian\nSuites: bookworm bookworm-updates\n";
        assert_eq!(mirror_from(deb822).as_deref(), Some("http://m.example/debian"));
        assert_eq!(mirror_from("deb http://x/ trixie main"), None);
    }
}
