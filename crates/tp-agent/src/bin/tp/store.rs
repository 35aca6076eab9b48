//! `tp store ...`: a TCPStore server and a client for people who debug a rendezvous,
//! and `tp bench store`, the server's operations per second under many clients.

use std::io::Write as _;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use tp_store::tcp::ServerConfig;
use tp_store::{Store, TcpStore, TcpStoreOptions, TcpStoreServer};

use crate::stats::Summary;

#[derive(Debug, Subcommand)]
pub(crate) enum StoreCommand {
    /// Serve a TCPStore (PyTorch-compatible) until killed; prints `SERVING <host:port>`.
    Serve {
        /// Address to bind ("::" = every address, IPv6 and IPv4).
        #[arg(long, default_value = "::")]
        host: String,
        /// Port (0 picks one).
        #[arg(long, default_value_t = 29500)]
        port: u16,
        /// Seconds a request may stay half-sent (and a new connection unvalidated).
        #[arg(long, default_value_t = 60.0)]
        request_timeout: f64,
    },
    /// Print a key's value (waits for it up to --timeout).
    Get {
        #[command(flatten)]
        at: Where,
        /// The key.
        key: String,
        /// Print the value as hex instead of text.
        #[arg(long)]
        hex: bool,
    },
    /// Set a key.
    Set {
        #[command(flatten)]
        at: Where,
        /// The key.
        key: String,
        /// The value (text).
        value: String,
    },
    /// Add to a counter and print the new value.
    Add {
        #[command(flatten)]
        at: Where,
        /// The key.
        key: String,
        /// The delta.
        #[arg(allow_hyphen_values = true)]
        delta: i64,
    },
    /// Wait until every key exists (up to --timeout).
    Wait {
        #[command(flatten)]
        at: Where,
        /// The keys.
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Print how many keys the server holds.
    NumKeys {
        #[command(flatten)]
        at: Where,
    },
    /// Join a rendezvous as rank R of N and print every rank's pid (for tests).
    #[command(hide = true)]
    Rendezvous {
        #[command(flatten)]
        at: Where,
        /// This process's rank.
        #[arg(long)]
        rank: usize,
        /// How many ranks.
        #[arg(long)]
        world: usize,
    },
}

/// Where the store is.
#[derive(Debug, Args)]
pub(crate) struct Where {
    /// The server's host.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// The server's port.
    #[arg(long, default_value_t = 29500)]
    port: u16,
    /// Seconds to wait for the server and for keys (0 = forever).
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
}

impl Where {
    fn connect(&self) -> Result<TcpStore, String> {
        TcpStore::new(TcpStoreOptions {
            host: self.host.clone(),
            port: self.port,
            timeout: Duration::try_from_secs_f64(self.timeout).map_err(|e| e.to_string())?,
            ..TcpStoreOptions::default()
        })
        .map_err(|e| e.to_string())
    }
}

pub(crate) fn run(cmd: &StoreCommand) -> Result<(), String> {
    match cmd {
        StoreCommand::Serve {
            host,
            port,
            request_timeout,
        } => {
            let config = ServerConfig {
                request_timeout: Duration::try_from_secs_f64(*request_timeout)
                    .map_err(|e| e.to_string())?,
                ..ServerConfig::default()
            };
            let server = TcpStoreServer::bind(host, *port, config)
                .map_err(|e| format!("cannot serve on {host}:{port}: {e}"))?;
            println!("SERVING {}", server.local_addr());
            std::io::stdout().flush().ok();
            server.join();
            Ok(())
        }
        StoreCommand::Get { at, key, hex } => {
            let v = at.connect()?.get(key).map_err(|e| e.to_string())?;
            if *hex {
                println!(
                    "{}",
                    v.iter().map(|b| format!("{b:02x}")).collect::<String>()
                );
            } else {
                println!("{}", String::from_utf8_lossy(&v));
            }
            Ok(())
        }
        StoreCommand::Set { at, key, value } => at
            .connect()?
            .set(key, value.as_bytes())
            .map_err(|e| e.to_string()),
        StoreCommand::Add { at, key, delta } => {
            let n = at.connect()?.add(key, *delta).map_err(|e| e.to_string())?;
            println!("{n}");
            Ok(())
        }
        StoreCommand::Wait { at, keys } => {
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            at.connect()?.wait(&keys, None).map_err(|e| e.to_string())
        }
        StoreCommand::NumKeys { at } => {
            println!("{}", at.connect()?.num_keys().map_err(|e| e.to_string())?);
            Ok(())
        }
        StoreCommand::Rendezvous { at, rank, world } => rendezvous(at, *rank, *world),
    }
}

/// The usual rendezvous: publish yourself, count yourself in, wait for everyone, read
/// everyone.
fn rendezvous(at: &Where, rank: usize, world: usize) -> Result<(), String> {
    let store = at.connect()?;
    let e = |e: tp_store::StoreError| e.to_string();
    store
        .set(
            &format!("rank/{rank}"),
            std::process::id().to_string().as_bytes(),
        )
        .map_err(e)?;
    store.add("joined", 1).map_err(e)?;
    let keys: Vec<String> = (0..world).map(|r| format!("rank/{r}")).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let pids = store.multi_get(&refs).map_err(e)?;
    let joined = store.add("joined", 0).map_err(e)?;
    let pids: Vec<String> = pids
        .iter()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    println!("RANK {rank} SAW {} JOINED>={joined}", pids.join(","));
    Ok(())
}

/// `tp bench store`.
#[derive(Debug, Args)]
pub(crate) struct StoreBenchArgs {
    /// Client threads (each with its own connection).
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Operations per client: set, get, add, compare_set and check in turn.
    #[arg(long, default_value_t = 1000)]
    ops: usize,
}

pub(crate) fn bench(args: &StoreBenchArgs) -> Result<(), String> {
    let regime = crate::limits::Regime::measure()?;
    let server =
        TcpStoreServer::bind("127.0.0.1", 0, ServerConfig::default()).map_err(|e| e.to_string())?;
    let port = server.port();
    let ops = args.ops;
    let start = Instant::now();
    let threads: Vec<_> = (0..args.clients)
        .map(|c| {
            std::thread::spawn(move || -> Result<Vec<Duration>, String> {
                let s = TcpStore::new(TcpStoreOptions {
                    port,
                    timeout: Duration::from_secs(60),
                    ..TcpStoreOptions::default()
                })
                .map_err(|e| e.to_string())?;
                let e = |e: tp_store::StoreError| e.to_string();
                let mut times = Vec::with_capacity(ops);
                let mut count = 0;
                for i in 0..ops {
                    let key = format!("c{c}/k{}", i % 10);
                    let t = Instant::now();
                    match i % 5 {
                        0 => s.set(&key, &(i as u64).to_le_bytes()).map_err(e)?,
                        1 => {
                            let v = s.get(&format!("c{c}/k{}", (i - 1) % 10)).map_err(e)?;
                            if v != ((i - 1) as u64).to_le_bytes() {
                                return Err(format!("client {c}: get {i} returned {v:?}"));
                            }
                        }
                        2 => {
                            count += 1;
                            let n = s.add(&format!("c{c}/n"), 1).map_err(e)?;
                            if n != count {
                                return Err(format!("client {c}: add returned {n}, not {count}"));
                            }
                        }
                        3 => {
                            let k = format!("c{c}/k{}", (i - 3) % 10);
                            let new = (i as u64).to_le_bytes();
                            let got = s
                                .compare_set(&k, &((i - 3) as u64).to_le_bytes(), &new)
                                .map_err(e)?;
                            if got != new {
                                return Err(format!("client {c}: compare_set {i} lost"));
                            }
                        }
                        _ => {
                            if !s.check(&[&format!("c{c}/n")]).map_err(e)? {
                                return Err(format!("client {c}: check {i} false"));
                            }
                        }
                    }
                    times.push(t.elapsed());
                }
                Ok(times)
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in threads {
        all.extend(t.join().map_err(|_| "a client panicked".to_string())??);
    }
    let took = start.elapsed();
    let s = Summary::of(&mut all);
    let regime = regime.ended()?;
    println!(
        "tp bench store --clients {} --ops {}: one server thread, {} client threads, loopback TCP",
        args.clients, args.ops, args.clients
    );
    println!("{}", regime.line());
    println!(
        "{} operations (set, get = WAIT + GET, add, compare_set, check), every result checked",
        all.len()
    );
    println!(
        "{:.0} operations/s; per operation p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs",
        all.len() as f64 / took.as_secs_f64(),
        s.p50_us,
        s.p90_us,
        s.p99_us
    );
    drop(server);
    Ok(())
}
