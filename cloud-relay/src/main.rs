//! The `backhaul-relay` command: runs the cloud relay, checks its configuration, and answers
//! questions about a running relay.

use std::path::PathBuf;
use std::process::ExitCode;

use backhaul_events::admin_client::AdminTarget;
use backhaul_relay::config::RelayConfig;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "backhaul-relay",
    version,
    about = "Backhaul relay: durable outbox between the broker and the ERP"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay until SIGINT or SIGTERM.
    Run {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Load and check a configuration file, print it with secrets redacted, and exit.
    CheckConfig {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Is the relay connected, delivering, and how much is waiting or dead-lettered?
    Status {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
    /// Per site: epoch, highest sequence stored, outbox depth, dead letters, last seen.
    Sites {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
    /// Where event ID is and what happened to it: device and receive time, site, epoch and
    /// sequence, the batch that carried it, when the relay stored it, every delivery attempt
    /// with the ERP's answer and latency, and the ERP's reference.
    Trace {
        #[command(flatten)]
        target: Target,
        /// The event's id.
        id: String,
        /// Only this site's event of that id (ids are unique per site).
        #[arg(long)]
        site: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// A site's days side by side, per UTC day and event type: accepted at the site (its
    /// agent's tally), known to the relay (waiting, posted, dead-lettered, discarded), and
    /// held by the ERP; then every event that differs and where it is now.
    Reconcile {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        site: String,
        /// The first day, YYYY-MM-DD (UTC).
        #[arg(long)]
        from: String,
        /// The last day, YYYY-MM-DD (UTC); the first day when left out.
        #[arg(long)]
        to: Option<String>,
        #[arg(long, conflicts_with = "csv")]
        json: bool,
        /// The rows, then the differences, as CSV.
        #[arg(long)]
        csv: bool,
    },
    /// Write what the relay delivered in a format others read.
    Export {
        #[command(subcommand)]
        format: ExportFormat,
    },
    /// The dead-letter queue: events the ERP refused for good.
    Dlq {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        action: DlqAction,
    },
}

#[derive(Subcommand)]
enum ExportFormat {
    /// A site's events the ERP took on those days (of the events' own timestamps, as far as
    /// outbox.trace_days reaches) as one GS1 EPCIS 2.0 document, mapped as [sink.epcis] says:
    /// the same ObjectEvents, with the same event ids, the EPCIS connector captures.
    Epcis {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        site: String,
        /// First day, YYYY-MM-DD.
        #[arg(long)]
        from: String,
        /// Last day, YYYY-MM-DD (inclusive).
        #[arg(long)]
        to: String,
        /// A TOML file with the [sink.epcis] mapping (owner_gln, gtins, locations, sites);
        /// default: --config.
        #[arg(long, value_name = "FILE")]
        mapping: Option<PathBuf>,
        /// Write the document here instead of to standard output.
        #[arg(long, short, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

/// Which relay a command talks to, and with which token.
#[derive(clap::Args)]
struct Target {
    /// The relay's admin URL (default: from --config, else http://127.0.0.1:8788).
    #[arg(long, global = true)]
    url: Option<String>,
    /// Read the admin address and token from this relay configuration.
    #[arg(long, short, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Send the admin token in this file (default: $BACKHAUL_ADMIN_TOKEN, else the token in
    /// --config).
    #[arg(long, value_name = "FILE", global = true)]
    token_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum DlqAction {
    /// List dead letters with the ERP's reasons.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter with its whole event.
    Show { id: u64 },
    /// Send dead letters back through the normal path, in their original order.
    Replay {
        ids: Vec<u64>,
        #[arg(long)]
        all: bool,
    },
    /// Drop dead letters for good.
    Discard { ids: Vec<u64> },
}

fn operate(target: Target, action: impl FnOnce(&AdminTarget) -> anyhow::Result<()>) -> ExitCode {
    backhaul_events::admin_client::end_quietly_on_closed_pipe();
    let result = backhaul_relay::cli::admin_target(
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Status { target, json } => {
            operate(target, |url| backhaul_relay::cli::status(url, json))
        }
        Command::Sites { target, json } => {
            operate(target, |url| backhaul_relay::cli::sites(url, json))
        }
        Command::Trace {
            target,
            id,
            site,
            json,
        } => operate(target, |url| {
            backhaul_relay::cli::trace(url, &id, site.as_deref(), json)
        }),
        Command::Reconcile {
            target,
            site,
            from,
            to,
            json,
            csv,
        } => operate(target, |url| {
            let to = to.as_deref().unwrap_or(&from);
            let format = match (json, csv) {
                (true, _) => backhaul_relay::cli::ReportFormat::Json,
                (_, true) => backhaul_relay::cli::ReportFormat::Csv,
                _ => backhaul_relay::cli::ReportFormat::Table,
            };
            backhaul_relay::cli::reconcile(url, &site, &from, to, format)
        }),
        Command::Export {
            format:
                ExportFormat::Epcis {
                    target,
                    site,
                    from,
                    to,
                    mapping,
                    out,
                },
        } => {
            let Some(mapping) = mapping.or_else(|| target.config.clone()) else {
                eprintln!(
                    "error: export epcis needs the [sink.epcis] mapping: --mapping FILE or --config FILE"
                );
                return ExitCode::FAILURE;
            };
            let mapping =
                match backhaul_relay::connector::epcis::EpcisConfig::load_mapping(&mapping) {
                    Ok(mapping) => mapping,
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::FAILURE;
                    }
                };
            operate(target, |url| {
                backhaul_relay::cli::export_epcis(url, &site, &from, &to, &mapping, out.as_deref())
            })
        }
        Command::Dlq { target, action } => operate(target, |url| match action {
            DlqAction::List { json } => backhaul_relay::cli::dlq_list(url, json),
            DlqAction::Show { id } => backhaul_relay::cli::dlq_show(url, id),
            DlqAction::Replay { ids, all } => backhaul_relay::cli::dlq_replay(url, &ids, all),
            DlqAction::Discard { ids } => backhaul_relay::cli::dlq_discard(url, &ids),
        }),
        Command::CheckConfig { config } => {
            let loaded = RelayConfig::load(&config).map(|l| l.config);
            backhaul_events::service::check_config(&config, loaded)
        }
        Command::Run { config } => backhaul_events::service::run(
            "relay",
            RelayConfig::load(&config),
            backhaul_relay::service::run,
        ),
    }
}
