//! The `backhaul-agent` command: runs the site agent, checks its configuration, and answers
//! questions about a running agent.

use std::path::PathBuf;
use std::process::ExitCode;

use backhaul_agent::config::AgentConfig;
use backhaul_events::admin_client::AdminTarget;
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
    /// Recover a damaged event log: copy every event still legible into a new log (same ids,
    /// original order), keep the damaged file under quarantine/ in the state directory, and
    /// report the sequence ranges that could not be read. Run it with the service stopped.
    Salvage {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Salvage even a log that opens without error.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
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

/// Which agent a command talks to, and with which token.
#[derive(clap::Args)]
struct Target {
    /// The agent's admin URL (default: from --config, else http://127.0.0.1:8789).
    #[arg(long)]
    url: Option<String>,
    /// Read the admin address and token from this agent configuration.
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Send the admin token in this file (default: $BACKHAUL_ADMIN_TOKEN, else the token in
    /// --config).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
}

fn operate(target: Target, action: impl FnOnce(&AdminTarget) -> anyhow::Result<()>) -> ExitCode {
    backhaul_events::admin_client::end_quietly_on_closed_pipe();
    let result = backhaul_agent::cli::admin_target(
        target.url,
        target.token_file.as_deref(),
        target.config.as_deref(),
    )
    .and_then(|target| action(&target));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn salvage(config: &std::path::Path, force: bool, json: bool) -> ExitCode {
    let result = AgentConfig::load(config)
        .map_err(anyhow::Error::from)
        .and_then(|loaded| {
            let options = backhaul_agent::service::log_options(&loaded.config);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            Ok(runtime.block_on(backhaul_agent::salvage::salvage(options, force))?)
        });
    match result {
        Ok(report) => {
            if json {
                match serde_json::to_string_pretty(&report) {
                    Ok(text) => println!("{text}"),
                    Err(e) => eprintln!("error: {e}"),
                }
            } else {
                print!("{}", backhaul_agent::salvage::render(&report));
            }
            ExitCode::SUCCESS
        }
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
        Command::CheckConfig { config } => {
            let loaded = AgentConfig::load(&config).map(|l| l.config);
            backhaul_events::service::check_config(&config, loaded)
        }
        Command::Salvage {
            config,
            force,
            json,
        } => salvage(&config, force, json),
        Command::Run { config } => backhaul_events::service::run(
            "agent",
            AgentConfig::load(&config),
            backhaul_agent::service::run,
        ),
    }
}
