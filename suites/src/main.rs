//! `trackcheck`: prove that KVM's guest-memory tracking mechanisms never lose a written page.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use trackcheck_suites::env::EnvReport;

/// Exit status for usage errors (clap uses the same).
const USAGE: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "trackcheck",
    version,
    about = "Conformance suite for KVM guest-memory tracking: proves every mechanism reports every written page",
    long_about = None,
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the host profile and, for every execution mode, backing and mechanism, whether it
    /// can run here and why not.
    Env {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Env { json } => {
            let report = EnvReport::probe();
            if json {
                match serde_json::to_string_pretty(&report) {
                    Ok(text) => println!("{text}"),
                    Err(e) => {
                        eprintln!("trackcheck: cannot serialise the profile: {e}");
                        return ExitCode::from(USAGE);
                    }
                }
            } else {
                print!("{}", report.text());
            }
            if let Some(why) = &report.host.kvm_unavailable {
                eprintln!("trackcheck: KVM is unavailable, so no trial can run here: {why}");
            }
            ExitCode::SUCCESS
        }
    }
}
