//! The `meridian` binary: parse the command line, set up logging and the
//! runtime, dispatch to `cmd::*`. Errors print as one line, not a backtrace.

use clap::Parser;
use meridian::cmd::{self, Cli};

fn main() {
    // The postmaster's supervisor runs no runtime and no logging of its own.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == meridian::postgres::supervisor::SUBCOMMAND) {
        std::process::exit(meridian::postgres::supervisor::main(&args[2..]));
    }
    let cli = Cli::parse();
    meridian::logging::init(cli.verbose);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("start the tokio runtime");
    let code = runtime.block_on(cmd::run(cli));
    // Do not wait for lingering tasks (a gateway's open connections, say).
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    std::process::exit(code);
}
