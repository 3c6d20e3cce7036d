//! `devboxd bench`: latency of a running server next to raw baselines measured in the same run.

use clap::Args;

#[derive(Args)]
pub struct BenchArgs {
    /// Base URL of the server.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    #[arg(long, env = "RUNLOOP_API_KEY")]
    pub api_key: String,
}

pub async fn run(_a: BenchArgs) -> Result<(), String> {
    Err("bench: not implemented yet".into())
}
