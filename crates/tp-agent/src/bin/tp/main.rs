//! `tp`: tp's command-line tool.
//!
//! - `tp demo`: two processes, one pipe, tensors both ways (the README's first command).
//! - `tp bench transport --transport tcp`: a ping-pong over a raw transport connection,
//!   like the original's `benchmark_transport`.
//! - `tp bench channel --channel basic|xth|cma|mpt`: a tensor ping-pong over one channel.
//! - `tp bench pipe`: message ping-pong over a pipe, like the original's `benchmark_pipe`.
//! - `tp bench limits`: this machine's physical limits, measured in the same run.
//! - `tp bench store`: a TCPStore server's operations per second under many clients.
//! - `tp bench rpc`: RPC calls per second and latency percentiles between two workers.
//! - `tp store serve|get|set|add|wait|num-keys`: a TCPStore server and client.

mod channel;
mod demo;
mod echo;
mod gpu;
mod limits;
mod pipebench;
mod rpc;
mod stats;
mod store;
mod transport;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "tp", version, about = "tp: move tensors between processes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Two processes, one pipe: what the handshake chose and why, and tensors of several
    /// sizes sent there and back, every byte checked.
    Demo(demo::DemoArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(Bench),
    /// A TCPStore (PyTorch-compatible) server, and a client to debug a rendezvous.
    #[command(subcommand)]
    Store(store::StoreCommand),
    /// RPC workers (internal: run by the demo, `bench rpc` and the tests).
    #[command(subcommand, hide = true)]
    Rpc(rpc::RpcCommand),
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Ping-pong over one transport connection (both ends spawned unless --mode is given).
    Transport(transport::TransportArgs),
    /// Tensor ping-pong over one channel (both ends spawned unless --mode is given).
    Channel(channel::ChannelArgs),
    /// Message ping-pong over a pipe, like the original's benchmark_pipe (both ends
    /// spawned unless --mode is given).
    Pipe(pipebench::PipeArgs),
    /// This machine's limits: memcpy bandwidth, raw loopback TCP round trip and streaming.
    Limits(CommonArgs),
    /// Operations per second of a TCPStore server under many clients.
    Store(store::StoreBenchArgs),
    /// RPC calls per second and latency between two workers (a second process is
    /// spawned), for small and large messages.
    Rpc(rpc::RpcBenchArgs),
    /// Holds a buffer for `bench limits`' process_vm_readv measurement (internal).
    #[command(hide = true)]
    CmaPeer {
        /// Bytes to hold.
        #[arg(long)]
        size: usize,
    },
    /// The raw-socket echo server the other benchmarks spawn (internal).
    #[command(hide = true)]
    RawServer,
    /// The eventfd ping-pong peer `bench limits` spawns (internal).
    #[command(hide = true)]
    EventfdPeer {
        /// The parent's pid.
        #[arg(long)]
        pid: i32,
        /// The parent's ping and pong eventfd numbers.
        #[arg(long, num_args = 2)]
        fds: Vec<i32>,
    },
}

/// Options every benchmark takes.
#[derive(Debug, Args, Clone)]
pub(crate) struct CommonArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// What every ping-pong benchmark takes: where its ends run, and what to send.
#[derive(Debug, Args, Clone)]
pub(crate) struct PingPongArgs {
    /// Which end(s) to run here.
    #[arg(long, value_enum, default_value = "both")]
    mode: Mode,
    /// Listen: the address to bind; connect: the listener's address.
    #[arg(long)]
    address: Option<String>,
    /// Message or tensor sizes, comma separated (K, M, G suffixes).
    #[arg(long, default_value = "8,1K,64K,1M,16M,64M")]
    sizes: String,
    /// Round trips per size (default: calibrated to --seconds).
    #[arg(long)]
    round_trips: Option<usize>,
    /// Target time per size when calibrating.
    #[arg(long, default_value_t = 1.5)]
    seconds: f64,
    #[command(flatten)]
    common: CommonArgs,
}

/// Which end(s) this process runs.
#[derive(Clone, Copy, Debug, Eq, PartialEq, ValueEnum)]
pub(crate) enum Mode {
    /// Spawn the listening end as a child process and run the connecting end here.
    Both,
    /// Listen, print `LISTENING <address>`, echo until the peer closes.
    Listen,
    /// Connect to --address and time the round trips.
    Connect,
}

/// `TP_LOG=error|warn|info|debug|trace` prints the library's log at that level and
/// above on stderr (nothing by default): which backends were not viable and why, which
/// path a channel took.
fn init_log() {
    let Ok(level) = std::env::var("TP_LOG") else {
        return;
    };
    match level.parse::<tracing::Level>() {
        Ok(level) => {
            let _ = tracing_subscriber::fmt()
                .with_max_level(level)
                .with_writer(std::io::stderr)
                .try_init();
        }
        Err(_) => eprintln!("tp: TP_LOG={level} is not a level (error, warn, info, debug, trace)"),
    }
}

fn main() {
    init_log();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(&args),
        Command::Bench(Bench::Transport(args)) => transport::run(&args),
        Command::Bench(Bench::Channel(args)) => channel::run(&args),
        Command::Bench(Bench::Pipe(args)) => pipebench::run(&args),
        Command::Bench(Bench::Limits(args)) => limits::run(&args),
        Command::Bench(Bench::Store(args)) => store::bench(&args),
        Command::Store(cmd) => store::run(&cmd),
        Command::Rpc(rpc::RpcCommand::Worker(args)) => rpc::worker(&args),
        Command::Bench(Bench::Rpc(args)) => rpc::bench(&args),
        Command::Bench(Bench::CmaPeer { size }) => limits::cma_peer(size),
        Command::Bench(Bench::RawServer) => limits::raw_server(),
        Command::Bench(Bench::EventfdPeer { pid, fds }) => limits::eventfd_peer(pid, &fds),
    };
    if let Err(e) = result {
        eprintln!("tp: {e}");
        std::process::exit(1);
    }
}
