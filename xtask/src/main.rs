//! Developer entry points: `cargo xtask test | demo | crdgen | cluster up/down | bench`.

#![forbid(unsafe_code)]

mod bench;
mod cluster;
mod crdgen;
mod demo;
mod test;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Cairn developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the tests need, then run every test (unit, QEMU, control plane, e2e).
    Test {
        /// Extra arguments passed to `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Start a local cluster and run Cairn's main job end to end.
    Demo,
    /// Regenerate crds/manifests/*.yaml from the Rust types.
    Crdgen {
        /// Fail instead of writing when the checked-in files differ.
        #[arg(long)]
        check: bool,
    },
    /// Local control plane with the operator and one agent per simulated node.
    Cluster {
        #[command(subcommand)]
        action: cluster::Action,
    },
    /// Benchmarks against QEMU, qemu-img, qemu-nbd and virtnbdbackup; writes BENCHMARKS.md.
    Bench {
        /// Fewer runs and smaller sizes (a few minutes).
        #[arg(long)]
        quick: bool,
        /// Call targets met even when a section started with a 1-minute load
        /// average above 0.5 (the file says so).
        #[arg(long)]
        allow_noisy: bool,
        /// Write BENCHMARKS.md again from a saved run (its results JSON) and the
        /// checked-in notes, without measuring.
        #[arg(long, value_name = "RESULTS_JSON")]
        render: Option<std::path::PathBuf>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Test { cargo_args } => test::run(&cargo_args),
        Task::Demo => demo::run(),
        Task::Crdgen { check } => crdgen::run(check),
        Task::Cluster { action } => cluster::run(action),
        Task::Bench {
            quick,
            allow_noisy,
            render,
        } => bench::run(quick, allow_noisy, render),
    }
}
