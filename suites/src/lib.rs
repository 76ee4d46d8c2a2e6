//! trackcheck's suites: scenarios, reports and the command-line tool's subcommands.
#![forbid(unsafe_code)]

pub mod env;
