//! tp-transport: byte-stream transports for tp's pipes (step 2 of the roadmap).
//!
//! **Status: not implemented yet.** This crate holds no code so far; nothing here works.
//! It exists so the workspace has its final shape. The plan:
//!
//! - `lib.rs`: the traits — a transport context (name, `is_viable` with a reason,
//!   domain descriptor, `listen`, `connect`), a listener (address, URL, `accept`) and a
//!   connection (ordered vectored writes, exact-length reads into the caller's buffer,
//!   length-prefixed frame reads bounded by [`tp_wire`]-style limits, close). Plain
//!   futures over `polling`/`async-io`, usable from any executor.
//! - `tcp`: `host:port`, IPv4 and IPv6, `TCP_NODELAY`, address guessing like the
//!   original (`TP_SOCKET_IFNAME`, the hostname, `127.0.0.1` with a warning).
//! - `shm`: abstract Unix socket bootstrap, memfd rings handed over with `SCM_RIGHTS`,
//!   eventfd wake-ups with brief spinning then parking, peer credential checks, and a
//!   sans-IO ring (core only, tested under miri).
//! - `ibv` (feature `ibv`): RDMA write-with-immediate into the peer's inbox ring, with the
//!   ring/ack protocol as a sans-IO module tested against an in-memory queue-pair model.
#![forbid(unsafe_code)]
