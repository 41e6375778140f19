//! The command line (a contract: `run`, `check` (and `check --live`), `demo`, `--version`, `--help`) and its exit codes.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// sysexits.h EX_USAGE: the config (or the command line) is wrong.
pub const EXIT_CONFIG: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "portcullis",
    version,
    about = "A TLS-terminating reverse proxy with hardened defaults"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve in the foreground until SIGTERM or SIGINT.
    Run {
        /// The TOML config file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Log format (overrides [log] format).
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
        /// Keep running as root when started as root with no [process] user. Insecure: every request is then
        /// handled by a root process.
        #[arg(long)]
        insecure_keep_root: bool,
    },
    /// Validate a config file: exit 0, or print every problem as FILE:LINE:COL: key: what is wrong and exit 64.
    Check {
        /// The TOML config file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Instead, ask the running instance through the config's [admin] listener: upstream servers,
        /// certificates, reloads, requests. Exit 1 if it cannot be reached or something is down.
        #[arg(long)]
        live: bool,
    },
    /// Serve a demo: a fresh self-signed certificate in front of a small built-in upstream page.
    Demo {
        /// Where to serve HTTPS.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8443")]
        https: SocketAddr,
        /// Log format.
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl From<LogFormat> for portcullis_config::LogFormat {
    fn from(f: LogFormat) -> Self {
        match f {
            LogFormat::Text => portcullis_config::LogFormat::Text,
            LogFormat::Json => portcullis_config::LogFormat::Json,
        }
    }
}
