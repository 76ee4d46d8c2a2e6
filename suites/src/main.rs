//! `trackcheck`: prove that KVM's guest-memory tracking mechanisms never lose a written page.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use trackcheck_harness::track::inject::Fault;
use trackcheck_harness::{Backing, ExecutionMode, HostProfile};
use trackcheck_suites::bench::{self, AccessOrder, BenchConfig, BenchReport, Sweep};
use trackcheck_suites::compare;
use trackcheck_suites::designs;
use trackcheck_suites::env::EnvReport;
use trackcheck_suites::golden::{self, Golden};
use trackcheck_suites::report::RunReport;
use trackcheck_suites::runner::{self, Selection};
use trackcheck_suites::scenarios;
use trackcheck_suites::spec::TrialSpec;
use trackcheck_suites::trial::{TrialResult, Verdict};

/// Exit status for usage errors and bad input (clap uses the same).
const USAGE: u8 = 2;

/// Where `trackcheck run` writes its reports unless `--out` says otherwise.
const DEFAULT_OUT: &str = "trackcheck-out";

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Text,
    Json,
    Ktap,
}

#[derive(Debug, clap::Args)]
struct Select {
    /// Run trials whose names contain any of these (all trials when none is given).
    filters: Vec<String>,
    /// Filters must match whole trial names.
    #[arg(long)]
    exact: bool,
    /// The oracle's self-tests (trackers with injected losses) instead of the matrix.
    #[arg(long)]
    selftest: bool,
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
    /// List trial names (and, for trials that cannot run here, why).
    List {
        #[command(flatten)]
        select: Select,
    },
    /// Run the conformance matrix (or the trials selected) and print the results.
    Run {
        #[command(flatten)]
        select: Select,
        /// Seed for every trial's programs (default: a stable per-trial seed).
        #[arg(long)]
        seed: Option<u64>,
        /// Cases per property (proptest) trial [default: $TRACKCHECK_CASES or 24].
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        cases: Option<u32>,
        /// Output format on stdout.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Directory for report.{txt,json,ktap} and replay files of failures [default:
        /// trackcheck-out]. Given explicitly, property trials also save new failing cases
        /// under DIR/proptest-regressions (and replay those saved there before).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Wrap every tracker with a deliberate loss; the affected trials must then fail.
        #[arg(long, value_name = "KIND")]
        inject_loss: Option<Fault>,
        /// Worker threads (default: one per CPU).
        #[arg(long)]
        jobs: Option<usize>,
        /// Directory of golden matrices (default: the checkout's golden/matrix).
        #[arg(long)]
        golden: Option<PathBuf>,
        /// Write the results as this host's golden matrix (merged with existing entries).
        #[arg(long)]
        bless: bool,
        /// Run the selection this many times (with --bless: tells steady from intermittent
        /// failures).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
        repeat: u32,
        /// Leave out the model trials (`model::`): they need no KVM and give the same result
        /// on every host, so lanes leave them to the host that boots them.
        #[arg(long)]
        no_models: bool,
    },
    /// Time every phase of every mechanism (populate, enable, dirty pass, harvest, rearm,
    /// disable), optionally sweeping memory size, vCPUs or dirty ratio.
    Bench(BenchArgs),
    /// Run trackcheck inside another kernel (Debian 6.1 / 6.12 / 7.2 or your own build), booted
    /// under QEMU as an x86_64 (AMD SVM + NPT) or arm64 host: the matrix, then the self-test.
    Vm(Box<trackcheck_suites::vm::cli::VmArgs>),
    /// Line up run reports (of several kernels, say) trial by trial: a table of verdicts, by
    /// default only the trials where they differ.
    Compare(compare::CompareArgs),
    /// Run the trial recorded in a replay file again, with its seed.
    Replay {
        /// A replay file written by `trackcheck run`.
        file: PathBuf,
        /// Output format on stdout.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
}

#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// Mechanisms to time (labels as `trackcheck list` shows them, e.g. clear-log/chunk64, or
    /// a mechanism name for all its variants) [default: all].
    #[arg(long = "mechanism", value_name = "M")]
    mechanisms: Vec<String>,
    /// Guest memory, all vCPUs together (K, M, G suffixes).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    mem: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    vcpus: u64,
    /// Tracked iterations (figures are min / median / max over them).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    iterations: u32,
    /// Host backing of guest memory.
    #[arg(long, default_value = "anon")]
    backing: Backing,
    /// Execution mode.
    #[arg(long, default_value = "native")]
    mode: ExecutionMode,
    /// Percentage of each vCPU's pages written per pass.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100))]
    write_percent: u32,
    /// Order of the writes.
    #[arg(long, value_enum, default_value_t = AccessOrder::Sequential)]
    access: AccessOrder,
    /// Sweep a variable around the configuration.
    #[arg(long, value_enum)]
    sweep: Option<Sweep>,
    /// Write the report as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write an SVG plot of the sweep (needs --sweep).
    #[arg(long, value_name = "FILE.svg", requires = "sweep")]
    plot: Option<PathBuf>,
    /// Compare two JSON reports phase by phase (ratios; nothing is run).
    #[arg(long, num_args = 2, value_names = ["A.json", "B.json"], conflicts_with_all = ["sweep", "plot", "harness"])]
    compare: Option<Vec<PathBuf>>,
    /// Time the harness itself: fresh vs reused machine, property-test cases per second.
    #[arg(long)]
    harness: bool,
}

/// `256M`, `1G`, `4096`, `2MiB` -> bytes.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 256M, 1G)"))?;
    let shift = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {s:?}: use K, M or G"
            ));
        }
    };
    let bytes = n
        .checked_shl(shift)
        .filter(|b| b >> shift == n)
        .ok_or_else(|| format!("{s:?} is too large"))?;
    if !(2 << 20..=64 << 30).contains(&bytes) {
        return Err(format!("{s:?}: guest memory must be between 2M and 64G"));
    }
    Ok(bytes / (2 << 20) * (2 << 20))
}

fn bench(args: BenchArgs) -> ExitCode {
    if let Some(files) = &args.compare {
        let (a, b) = match (bench::load_report(&files[0]), bench::load_report(&files[1])) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return fail_usage(&e),
        };
        print!("{}", bench::compare(&a, &b));
        return ExitCode::SUCCESS;
    }
    let host = HostProfile::probe();
    if let Some(why) = &host.kvm_unavailable {
        eprintln!("trackcheck: KVM is unavailable: {why}");
        return ExitCode::from(1);
    }
    if args.harness {
        return match bench::harness_cost(args.mode, 10, 200) {
            Ok(h) => {
                println!(
                    "host {} | kernel {} | rev {}",
                    host.key(),
                    host.kernel.release,
                    option_env!("TRACKCHECK_GIT_REV").unwrap_or("unknown")
                );
                print!("{}", h.text());
                if let Some(path) = &args.json
                    && let Err(e) = write_json(path, &h)
                {
                    eprintln!("trackcheck: cannot write {}: {e}", path.display());
                    return ExitCode::from(1);
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("trackcheck: {e}");
                ExitCode::from(1)
            }
        };
    }
    let all = bench::default_mechanisms();
    let mechanisms: Vec<_> = if args.mechanisms.is_empty() {
        all
    } else {
        let picked: Vec<_> = all
            .into_iter()
            .filter(|t| {
                args.mechanisms
                    .iter()
                    .any(|m| *m == t.label() || *m == t.mechanism().name())
            })
            .collect();
        if picked.is_empty() {
            let names: Vec<String> = bench::default_mechanisms()
                .iter()
                .map(|t| t.label())
                .collect();
            return fail_usage(&format!(
                "no mechanism matches {:?}; expected one of {}",
                args.mechanisms,
                names.join(", ")
            ));
        }
        picked
    };
    let vcpus = usize::try_from(args.vcpus).unwrap_or(1);
    if args.mem / 4096 < vcpus as u64 * 512 {
        return fail_usage(&format!(
            "--mem {}M is too small for {vcpus} vCPUs (at least 2M each)",
            args.mem >> 20
        ));
    }
    // The bound on --mem: what this host and this process's memory cgroup can give, refused
    // before anything runs (the harness checks every guest memory again when it is made;
    // hugetlb backings draw on the hugetlb pool instead, which refuses with its own error).
    if args.backing.hugetlb_kib().is_none()
        && let Err(why) = trackcheck_harness::memory::MemoryBudget::probe().decide(args.mem)
    {
        return fail_usage(&format!("--mem {}M: {why}", args.mem >> 20));
    }
    let config = BenchConfig {
        mechanisms,
        mem_bytes: args.mem,
        vcpus,
        iterations: args.iterations,
        backing: args.backing,
        mode: args.mode,
        write_percent: args.write_percent,
        access: args.access,
    };
    let progress = |what: &str| eprintln!("trackcheck bench: {what}");
    let results = bench::run(&config, &host, &progress);
    let sweep = args
        .sweep
        .map(|v| bench::sweep(&config, v, &host, &progress));
    let report = BenchReport::new(&host, config, results, sweep);
    print!("{}", report.text());
    if let Some(path) = &args.json
        && let Err(e) = write_json(path, &report)
    {
        eprintln!("trackcheck: cannot write {}: {e}", path.display());
        return ExitCode::from(1);
    }
    if let (Some(path), Some(sweep)) = (&args.plot, &report.sweep) {
        let title = format!(
            "trackcheck bench on {} ({}), rev {}",
            report.host_key, report.kernel, report.revision
        );
        if let Err(e) = bench::plot(sweep, &title, path) {
            eprintln!("trackcheck: cannot write the plot: {e}");
            return ExitCode::from(1);
        }
        eprintln!("trackcheck: wrote {}", path.display());
    }
    ExitCode::SUCCESS
}

fn write_json(path: &std::path::Path, value: &impl serde::Serialize) -> Result<(), String> {
    let json = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    std::fs::write(path, json).map_err(|e| e.to_string())
}

fn fail_usage(message: &str) -> ExitCode {
    eprintln!("trackcheck: {message}");
    ExitCode::from(USAGE)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Env { json } => env(json),
        Command::List { select } => list(&select),
        Command::Run {
            select,
            seed,
            cases,
            format,
            out,
            inject_loss,
            jobs,
            golden,
            bless,
            repeat,
            no_models,
        } => {
            if let Some(n) = cases {
                scenarios::set_cases(n);
            }
            // Regression files are saved only where asked: never into the source tree.
            scenarios::save_regressions_in(out.as_ref().map(|d| d.join("proptest-regressions")));
            let out = out.unwrap_or_else(|| PathBuf::from(DEFAULT_OUT));
            let selection = Selection {
                filters: select.filters,
                exact: select.exact,
                selftest: select.selftest,
                inject: inject_loss,
            };
            let specs = selection.specs();
            let models = if no_models {
                Vec::new()
            } else {
                model_trials(&selection)
            };
            if specs.is_empty() && models.is_empty() {
                return fail_usage(&format!(
                    "no trial matches {:?} (trackcheck list shows them all)",
                    selection.filters
                ));
            }
            if bless && (selection.inject.is_some() || selection.selftest) {
                return fail_usage(
                    "--bless records the conformance matrix; it cannot be combined with --inject-loss or --selftest",
                );
            }
            let trials = (specs.as_slice(), models.as_slice());
            run(trials, seed, format, &out, jobs, golden, bless, repeat)
        }
        Command::Bench(args) => bench(args),
        Command::Vm(args) => trackcheck_suites::vm::cli::main(*args, golden::default_dir()),
        Command::Compare(args) => match compare::run(&args) {
            Ok(text) => {
                // A closed pipe (`| head`) is not an error of the comparison.
                let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
                ExitCode::SUCCESS
            }
            Err(e) => fail_usage(&e.to_string()),
        },
        Command::Replay { file, format } => match runner::read_replay(&file) {
            Err(e) => fail_usage(&e),
            Ok(r) => {
                eprintln!(
                    "trackcheck: replaying {} with seed {} (recorded: {} {})",
                    r.name,
                    r.seed,
                    r.verdict.name(),
                    r.reason.unwrap_or_default()
                );
                let out = file
                    .parent()
                    .and_then(|p| p.parent())
                    .map_or_else(|| PathBuf::from(DEFAULT_OUT), PathBuf::from);
                run(
                    (std::slice::from_ref(&r.spec), &[]),
                    Some(r.seed),
                    format,
                    &out,
                    Some(1),
                    None,
                    false,
                    1,
                )
            }
        },
    }
}

fn env(json: bool) -> ExitCode {
    let report = EnvReport::probe();
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => return fail_usage(&format!("cannot serialise the profile: {e}")),
        }
    } else {
        print!("{}", report.text());
    }
    if let Some(why) = &report.host.kvm_unavailable {
        eprintln!("trackcheck: KVM is unavailable, so no trial can run here: {why}");
    }
    ExitCode::SUCCESS
}

fn list(select: &Select) -> ExitCode {
    let selection = Selection {
        filters: select.filters.clone(),
        exact: select.exact,
        selftest: select.selftest,
        inject: None,
    };
    let specs = selection.specs();
    let models = model_trials(&selection);
    if specs.is_empty() && models.is_empty() {
        return fail_usage(&format!(
            "no trial matches {:?} (trackcheck list shows them all)",
            select.filters
        ));
    }
    let host = HostProfile::probe();
    for spec in specs {
        match scenarios::precheck(&spec, &host) {
            Ok(()) => println!("{}", spec.name()),
            Err(reason) => println!("{}  # skip: {reason}", spec.name()),
        }
    }
    for t in models {
        match (t.check, &host.kvm_unavailable) {
            (designs::trials::Check::Anchor, Some(why)) => {
                println!("{}  # skip: needs KVM: {why}", t.name());
            }
            _ => println!("{}", t.name()),
        }
    }
    ExitCode::SUCCESS
}

/// The model trials a selection names (none for self-tests or injected losses: the models
/// carry their own known-bad variants).
fn model_trials(selection: &Selection) -> Vec<designs::trials::ModelTrial> {
    if selection.selftest || selection.inject.is_some() {
        return Vec::new();
    }
    designs::trials::select(&selection.filters, selection.exact)
}

#[expect(
    clippy::too_many_arguments,
    reason = "one parameter per command-line option"
)]
fn run(
    (specs, models): (&[TrialSpec], &[designs::trials::ModelTrial]),
    seed: Option<u64>,
    format: Format,
    out: &PathBuf,
    jobs: Option<usize>,
    golden_dir: Option<PathBuf>,
    bless: bool,
    repeat: u32,
) -> ExitCode {
    let host = HostProfile::probe();
    if let Some(why) = &host.kvm_unavailable {
        eprintln!("trackcheck: KVM is unavailable, every trial will be skipped: {why}");
    }
    let golden_dir = golden_dir.unwrap_or_else(golden::default_dir);
    let golden = match Golden::load(&golden_dir, &host.golden_key()) {
        Ok(g) => g,
        Err(e) => return fail_usage(&format!("bad golden file: {e}")),
    };
    if let Some(missing) = golden.missing_note().filter(|_| !bless) {
        eprintln!("trackcheck: {missing}");
    }
    let jobs = jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    let start = Instant::now();
    let mut runs: Vec<Vec<TrialResult>> = Vec::new();
    for round in 0..repeat {
        let total = specs.len() + models.len();
        let bar = ProgressBar::new(total as u64);
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:40}] {pos}/{len} trials {elapsed} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("run {}/{repeat}", round + 1));
        let progress = |done: usize, r: &TrialResult| {
            if r.verdict.is_unexpected() || r.verdict == Verdict::KnownFailure {
                let line = format!(
                    "{} {} — {}",
                    r.verdict.name().to_uppercase(),
                    r.name,
                    r.reason.as_deref().unwrap_or("")
                );
                if bar.is_hidden() {
                    eprintln!("{line}")
                } else {
                    bar.println(line)
                }
            }
            bar.inc(1);
            // Without a terminal (a lane's console, CI logs) a line every 100 trials.
            if bar.is_hidden() && (done.is_multiple_of(100) || done == total) {
                eprintln!(
                    "trackcheck: {done}/{total} trials, {:.0} s",
                    start.elapsed().as_secs_f64()
                );
            }
        };
        let mut results = runner::run_all(specs, seed, &host, &golden, jobs, &|d, _, r| {
            progress(d, r);
        });
        let ran = results.len();
        let modelled = designs::trials::run_all(models, &golden, &|i, r| progress(ran + i + 1, r));
        results.extend(modelled);
        runs.push(results);
        bar.finish_and_clear();
    }
    let seconds = start.elapsed().as_secs_f64();
    if bless {
        let text = golden::bless(&host.golden_key(), &host.kernel.release, &runs, &golden);
        if let Err(e) =
            std::fs::create_dir_all(&golden_dir).and_then(|()| std::fs::write(&golden.path, &text))
        {
            return fail_usage(&format!("cannot write {}: {e}", golden.path.display()));
        }
        eprintln!(
            "trackcheck: wrote {} ({} run(s) per trial): review it before committing",
            golden.path.display(),
            runs.len()
        );
    }
    let mut results = runner::fold_runs(runs);
    if let Err(e) = runner::write_replays(out, &host.key(), &mut results) {
        eprintln!("trackcheck: cannot write replay files: {e}");
    }
    let unmatched = golden
        .entries
        .keys()
        .filter(|k| !results.iter().any(|r| &r.name == *k))
        .count();
    let info = golden.info(unmatched);
    let mut report = RunReport::new(host, info, results, seconds / f64::from(repeat));
    report.unattributed_kernel_log = trackcheck_suites::kernel_log::take_unattributed();
    let text = report.text();
    let ktap = report.ktap();
    let json = serde_json::to_string_pretty(&report).unwrap_or_default();
    match format {
        Format::Text => print!("{text}"),
        Format::Json => println!("{json}"),
        Format::Ktap => print!("{ktap}"),
    }
    let wrote = std::fs::create_dir_all(out)
        .and_then(|()| std::fs::write(out.join("report.txt"), &text))
        .and_then(|()| std::fs::write(out.join("report.json"), &json))
        .and_then(|()| std::fs::write(out.join("report.ktap"), &ktap));
    if let Err(e) = wrote.and_then(|()| designs::trials::write_text(&report.trials, out)) {
        eprintln!("trackcheck: cannot write reports to {}: {e}", out.display());
    }
    if report.has_unexpected() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
