//! The `backhaul-agent` command: runs the site agent, checks its configuration, and answers
//! questions about a running agent.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use backhaul_agent::config::AgentConfig;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "backhaul-agent",
    version,
    about = "Backhaul site agent: durable store-and-forward of warehouse events"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent until SIGINT or SIGTERM.
    Run {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Load and check a configuration file, print it with secrets redacted, and exit.
    CheckConfig {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Link, backlog (count, bytes, oldest), last ack, ingest, rejects and ERP refusals.
    Status {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
    /// Events refused at the edge (with the rules they broke) and refused by the ERP.
    Rejects {
        #[command(flatten)]
        target: Target,
        /// Keep printing new rejects as they arrive.
        #[arg(long, short)]
        follow: bool,
        #[arg(long)]
        json: bool,
    },
    /// Print events as they are accepted (durable), one JSON line each.
    Tail {
        #[command(flatten)]
        target: Target,
    },
}

/// Which agent a command talks to.
#[derive(clap::Args)]
struct Target {
    /// The agent's HTTP URL (default: from --config, else http://127.0.0.1:8787).
    #[arg(long)]
    url: Option<String>,
    /// Read the HTTP address from this agent configuration.
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
}

fn operate(target: Target, action: impl FnOnce(&str) -> anyhow::Result<()>) -> ExitCode {
    let result = backhaul_agent::cli::admin_url(target.url, target.config.as_deref())
        .and_then(|url| action(&url));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Status { target, json } => {
            operate(target, |url| backhaul_agent::cli::status(url, json))
        }
        Command::Rejects {
            target,
            follow,
            json,
        } => operate(target, |url| {
            backhaul_agent::cli::rejects(url, json, follow)
        }),
        Command::Tail { target } => operate(target, backhaul_agent::cli::tail),
        Command::CheckConfig { config } => match AgentConfig::load(&config) {
            Ok(loaded) => {
                // A closed stdout (`| head`) is not an error worth a panic.
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{}: OK", config.display());
                let _ = writeln!(out, "{:#?}", loaded.config);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Run { config } => {
            init_logging();
            let loaded = match AgentConfig::load(&config) {
                Ok(loaded) => loaded,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(backhaul_agent::service::run(loaded)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("agent stopped: {e:#}");
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BACKHAUL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = std::env::var("BACKHAUL_LOG_FORMAT").is_ok_and(|f| f == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
