//! The `ringmx` command.

use std::process::ExitCode;

const USAGE: &str = "\
ringmx — SMTP front end for Linux edge hosts

USAGE:
    ringmx --version     print the version
    ringmx --help        print this help

The SMTP core (src/proto) is in place; the server command (`ringmx run`) comes with the
runtime (see README.md).
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--version" | "-V") => {
            println!("ringmx {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        None | Some("--help" | "-h" | "help") => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!("ringmx: unknown command {other:?}\n\n{USAGE}");
            ExitCode::from(2)
        }
    }
}
