//! trackcheck's suites: scenarios, reports and the command-line tool's subcommands.
#![forbid(unsafe_code)]

pub mod bench;
pub mod compare;
pub mod designs;
pub mod env;
pub mod golden;
pub mod kernel_log;
pub mod matrix;
pub mod model;
pub mod programs;
pub mod report;
pub mod runner;
pub mod scenarios;
pub mod spec;
pub mod strategies;
pub mod trial;
pub mod vm;
