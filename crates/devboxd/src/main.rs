//! devboxd: the server, the image builder, the benchmark and a terminal client, in one binary.

mod bench;
mod cli;

use clap::{Args, Parser, Subcommand};
use devbox_core::{tenant_of_key, Manager, ManagerConfig, Store};
use devbox_runtime::container::ContainerRuntime;
use devbox_runtime::image::{ImageStore, DEFAULT_IMAGE};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Parser)]
#[command(name = "devboxd", version, about = "Self-hosted devboxes behind the Runloop Devbox API")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the API server.
    Serve(ServeArgs),
    /// Manage base images.
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// Measure latency against a running server, beside raw baselines.
    Bench(bench::BenchArgs),
    /// Open an interactive shell in a devbox, like ssh (a PTY session over the server).
    Shell(cli::ShellArgs),
    /// Run a command in a devbox (in a terminal if ours is one) and exit with its exit code.
    Exec(cli::ExecArgs),
}

#[derive(Args, Clone)]
struct Dirs {
    /// Where state (SQLite) and box files live.
    #[arg(long, default_value = "/var/lib/devboxd")]
    data_dir: PathBuf,
    /// Where base images live (default: DATA_DIR/images).
    #[arg(long)]
    image_dir: Option<PathBuf>,
}

impl Dirs {
    fn images(&self) -> ImageStore {
        ImageStore::new(&self.image_dir.clone().unwrap_or_else(|| self.data_dir.join("images")))
    }
}

#[derive(Args)]
struct ServeArgs {
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    #[command(flatten)]
    dirs: Dirs,
    /// An API key; each key is a separate tenant. Repeat for more. Without any, a key is
    /// generated once, saved in DATA_DIR/api-key and printed.
    #[arg(long = "api-key")]
    api_keys: Vec<String>,
    /// Suspended devboxes hibernate (processes stopped, memory released, disk kept) after
    /// this many seconds; 0 never.
    #[arg(long, default_value_t = 3600)]
    hibernate_after: u64,
    /// What SIGTERM/SIGINT does to running devboxes: keep them running (reattached on the
    /// next start), shut them down, or hibernate them.
    #[arg(long, value_enum, default_value = "keep")]
    on_exit: OnExit,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OnExit {
    Keep,
    Shutdown,
    Hibernate,
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Build the default image unless it exists.
    Build(Dirs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,hyper=warn,h2=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let result = match cli.cmd {
        Cmd::Serve(a) => rt.block_on(serve(a)),
        Cmd::Image { cmd: ImageCmd::Build(d) } => build_image(&d.images()).map(|_| ()),
        Cmd::Bench(a) => rt.block_on(bench::run(a)),
        Cmd::Shell(a) => cli::exit_with(rt.block_on(cli::shell(a))),
        Cmd::Exec(a) => cli::exit_with(rt.block_on(cli::exec(a))),
    };
    if let Err(e) = result {
        eprintln!("devboxd: error: {e}");
        std::process::exit(1);
    }
}

/// Build the default image, showing mmdebstrap's steps (a spinner on a terminal, plain lines
/// in logs).
fn build_image(images: &ImageStore) -> Result<PathBuf, String> {
    std::fs::create_dir_all(images.dir()).map_err(|e| format!("create {}: {e}", images.dir().display()))?;
    if images.is_built(DEFAULT_IMAGE) {
        eprintln!("image {DEFAULT_IMAGE:?} already built in {}", images.dir().display());
        return images.rootfs(DEFAULT_IMAGE).map_err(|e| e.to_string());
    }
    eprintln!("building image {DEFAULT_IMAGE:?} in {} (takes about a minute)...", images.dir().display());
    let start = std::time::Instant::now();
    let result = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        let r = images.build_default(&mut |line| bar.set_message(line.to_string()));
        bar.finish_and_clear();
        r
    } else {
        images.build_default(&mut |line| eprintln!("  image: {line}"))
    };
    let rootfs = result.map_err(|e| e.to_string())?;
    eprintln!("image {DEFAULT_IMAGE:?} built in {:.1} s", start.elapsed().as_secs_f64());
    Ok(rootfs)
}

/// Keys from the command line, or the saved (or newly generated) key of this data dir.
fn api_keys(given: &[String], data_dir: &Path) -> Result<Vec<String>, String> {
    if !given.is_empty() {
        if given.iter().any(|k| k.trim().is_empty()) {
            return Err("--api-key must not be empty".into());
        }
        return Ok(given.to_vec());
    }
    let path = data_dir.join("api-key");
    if let Ok(k) = std::fs::read_to_string(&path) {
        let k = k.trim().to_string();
        eprintln!("API key (from {}): {k}", path.display());
        return Ok(vec![k]);
    }
    let mut raw = [0u8; 24];
    getrandom::fill(&mut raw).map_err(|e| format!("random key: {e}"))?;
    let key: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let key = format!("dbk_{key}");
    std::fs::write(&path, &key).map_err(|e| format!("save {}: {e}", path.display()))?;
    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    eprintln!("generated API key (saved in {}): {key}", path.display());
    Ok(vec![key])
}

async fn serve(a: ServeArgs) -> Result<(), String> {
    let data = &a.dirs.data_dir;
    std::fs::create_dir_all(data).map_err(|e| format!("create data dir {}: {e}", data.display()))?;
    let data = data.canonicalize().map_err(|e| format!("data dir {}: {e}", data.display()))?;
    let _ = std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700));
    let keys = api_keys(&a.api_keys, &data)?;
    let images = a.dirs.images();
    let images_blocking = images.clone();
    tokio::task::spawn_blocking(move || build_image(&images_blocking)).await.map_err(|e| e.to_string())??;
    let runtime = ContainerRuntime::new(&data, images).map_err(|e| e.to_string())?;
    tracing::info!("{}", runtime.describe());
    let store = Store::open(&data.join("devboxd.db")).map_err(|e| format!("open store: {e}"))?;
    let manager = Manager::start(
        ManagerConfig {
            image: DEFAULT_IMAGE.into(),
            data_dir: Some(data.clone()),
            hibernate_after_ms: (a.hibernate_after > 0).then_some(a.hibernate_after as i64 * 1000),
        },
        store,
        Arc::new(runtime),
    )
    .await
    .map_err(|e| format!("load devboxes: {e}"))?;
    let key_map: HashMap<String, String> = keys.iter().map(|k| (k.clone(), tenant_of_key(k))).collect();
    let app = devbox_api::router(devbox_api::AppState {
        manager: manager.clone(),
        keys: Arc::new(key_map),
        data_dir: Some(data.clone()),
    });
    let listener = tokio::net::TcpListener::bind(a.listen).await.map_err(|e| format!("listen on {}: {e}", a.listen))?;
    tracing::info!(listen = %a.listen, data_dir = %data.display(), tenants = keys.len(), "devboxd serving");
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        let _ = stopping_tx.send(());
    });
    // Long polls and streams may hold requests open; they get a few seconds, not forever.
    let grace = async {
        if stopping_rx.await.is_ok() {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        r = server => r.map_err(|e| format!("server: {e}"))?,
        _ = grace => tracing::warn!("requests still open 5 s after the signal were cut"),
    }
    let mode = match a.on_exit {
        OnExit::Keep => {
            tracing::info!("shutting down; devboxes keep running and are reattached on the next start");
            devbox_core::ExitMode::Keep
        }
        OnExit::Shutdown => {
            tracing::info!("shutting down every devbox before exiting");
            devbox_core::ExitMode::Shutdown
        }
        OnExit::Hibernate => {
            tracing::info!("hibernating every devbox before exiting");
            devbox_core::ExitMode::Hibernate
        }
    };
    manager.on_exit(mode).await;
    Ok(())
}
