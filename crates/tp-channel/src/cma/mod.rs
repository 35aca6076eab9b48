//! cma: tensors between processes of one machine and user, by Cross-Memory Attach.
//!
//! The sender sends `{pid, address, length}` of its buffer; the receiver pulls the
//! bytes with `process_vm_readv` straight into its own buffer (in chunks under the
//! kernel's per-call limit, and from [`CmaConfig::parallel_from`] in pieces shared with
//! helper threads) and acknowledges;
//! the sender keeps its buffer until then (the protocol is in `handoff`).
//!
//! **The sender helps.** A sender waiting for its acknowledgement idles on its core, so
//! from [`CmaConfig::help_from`] it offers help: the receiver asks it to write the back
//! half of the tensor into the receive buffer with `process_vm_writev` while it pulls
//! the front half — two cores copy instead of one, without waking a thread. The
//! request names the receiving process and addresses in it, so the sender checks it
//! first: the descriptor offering help carries a secret of the channel's, and the
//! request must point at that secret in the named process's memory (read with
//! `process_vm_readv`) — only the receiver, or a process it can already write to, can
//! put it there. A sender does this check once per channel.
//!
//! **Viability is probed, not assumed** ([`CmaContext::new`]):
//! 1. boot id, PID and user namespaces are read (they go into the descriptor);
//! 2. real, effective and saved uids are equal, and the same for gids — the kernel's
//!    ptrace access check compares them;
//! 3. the process is dumpable;
//! 4. Linux security modules (`/sys/kernel/security/lsm`): with `capability`, the
//!    permitted capabilities join the descriptor (a peer must hold the same set); Yama
//!    scope 1 allows only ancestors, so the context calls
//!    `prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY)` if [`CmaConfig::set_ptracer`] allows
//!    it (process-wide!) and is not viable otherwise; scope 2 or 3: not viable;
//! 5. a trial `process_vm_readv` of our own memory must return the right bytes (this
//!    catches seccomp filters, as in default Docker, and kernels without CMA).
//!
//! Descriptor: `cma:<boot id>:<pid ns>:<user ns>:<uid>:<gid>[:<capabilities>]`, so cma is
//! chosen only between processes on one machine, in one PID and user namespace, under
//! one identity.

#[allow(unsafe_code)]
mod sys;
pub mod wire;

use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::handoff::{Fetch, HandoffContext, Help};
use crate::{ChannelError, RecvBuf, SendBuf};
use wire::{HelpRequest, SECRET_LEN, TensorDescriptor};

/// The piece of a large pull one thread takes at a time.
const PIECE: usize = 256 << 10;

/// Settings of a cma context.
#[derive(Clone, Copy, Debug)]
pub struct CmaConfig {
    /// Under Yama ptrace scope 1, allow any process of ours to read our memory
    /// (`PR_SET_PTRACER_ANY`, process-wide), as the original does. Default `true`.
    pub set_ptracer: bool,
    /// Tensors at least this large are pulled by several threads at once, in pieces of
    /// 256 KiB that the receiving thread and the process's copy helpers (kept alive
    /// between pulls) take in turn. Default 2 MiB (below it, a second thread's help
    /// did not pay for itself in a ping-pong on 2 vCPUs).
    pub parallel_from: usize,
    /// How many threads at most pull one large tensor, the receiving one included.
    /// Default: available parallelism, at most 4.
    pub threads: usize,
    /// Tensors at least this large are sent with an offer of help (four times this
    /// large when other sends wait behind them: an offer holds their descriptors back):
    /// the receiver may ask the sender to write the back half itself (see the module
    /// docs). Default 16 KiB (below it, the extra messages cost more than half a copy
    /// saves); `usize::MAX` never offers. A receiver asks whenever it is offered.
    pub help_from: usize,
}

impl Default for CmaConfig {
    fn default() -> Self {
        Self {
            set_ptracer: true,
            parallel_from: 2 << 20,
            threads: std::thread::available_parallelism()
                .map_or(1, std::num::NonZero::get)
                .min(4),
            help_from: 16 << 10,
        }
    }
}

/// The cma channel context.
#[derive(Debug)]
pub struct CmaContext {
    core: HandoffContext,
    config: CmaConfig,
}

impl Default for CmaContext {
    fn default() -> Self {
        Self::new(CmaConfig::default())
    }
}

/// `Uid:`/`Gid:` of /proc/self/status: real, effective, saved, filesystem.
fn status_ids(status: &str, key: &str) -> Option<Vec<u32>> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .split_whitespace()
        .map(|v| v.parse().ok())
        .collect()
}

fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
}

/// Runs the probe; `Ok(descriptor)` or why not.
fn probe(config: &CmaConfig) -> Result<Vec<u8>, String> {
    let boot = crate::system::boot_id()?;
    let pidns = crate::system::namespace("pid")?;
    let userns = crate::system::namespace("user")?;
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("cannot read /proc/self/status: {e}"))?;
    let uids = status_ids(&status, "Uid:").ok_or("no Uid line in /proc/self/status")?;
    let gids = status_ids(&status, "Gid:").ok_or("no Gid line in /proc/self/status")?;
    let (Some(&uid), Some(&gid)) = (uids.first(), gids.first()) else {
        return Err("malformed Uid/Gid lines".to_string());
    };
    if uids.iter().take(3).any(|&u| u != uid) || gids.iter().take(3).any(|&g| g != gid) {
        return Err(format!(
            "real, effective and saved ids differ (uids {uids:?}, gids {gids:?})"
        ));
    }
    match rustix::process::dumpable_behavior() {
        Ok(rustix::process::DumpableBehavior::Dumpable) => {}
        Ok(other) => return Err(format!("the process is not dumpable ({other:?})")),
        Err(e) => return Err(format!("PR_GET_DUMPABLE failed: {e}")),
    }
    let lsms = std::fs::read_to_string("/sys/kernel/security/lsm")
        .unwrap_or_else(|_| "capability,yama".to_string());
    let mut descriptor = format!("cma:{boot}:{pidns}:{userns}:{uid}:{gid}");
    for lsm in lsms.trim().split(',') {
        match lsm {
            "capability" => {
                let caps = status_field(&status, "CapPrm:").unwrap_or("unknown");
                descriptor.push(':');
                descriptor.push_str(caps);
            }
            "yama" => match std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
                .ok()
                .map(|s| s.trim().to_string())
                .as_deref()
            {
                None | Some("0") => {}
                Some("1") if config.set_ptracer => {
                    rustix::process::set_ptracer(rustix::process::PTracer::Any)
                        .map_err(|e| format!("Yama scope 1 and PR_SET_PTRACER failed: {e}"))?;
                }
                Some("1") => {
                    return Err("Yama ptrace scope 1 and CmaConfig::set_ptracer is off".to_string());
                }
                Some(scope) => return Err(format!("Yama ptrace scope {scope} forbids it")),
            },
            _ => {}
        }
    }
    // The trial: read our own memory through the kernel.
    let src: Vec<u8> = (0..=255u8).collect();
    let mut dst = vec![0u8; src.len()];
    let pid = i32::try_from(std::process::id()).map_err(|_| "pid out of range")?;
    match sys::read_remote(pid, src.as_ptr() as u64, &mut dst) {
        Ok(n) if n == src.len() && dst == src => {}
        Ok(n) => return Err(format!("trial process_vm_readv moved {n} wrong bytes")),
        Err(e) => return Err(format!("trial process_vm_readv failed: {e}")),
    }
    Ok(descriptor.into_bytes())
}

impl CmaContext {
    /// Creates a context and probes viability for real.
    pub fn new(config: CmaConfig) -> Self {
        Self {
            core: HandoffContext::new("cma", probe(&config)),
            config,
        }
    }
}

crate::handoff_channel_context!(CmaContext, "cma", |this| Pull::new(this.config));

/// The receiver pulls; the sender holds its buffer meanwhile, and helps with large ones.
struct Pull {
    pid: u32,
    config: CmaConfig,
    /// Sender: the secret an offer of help carries (none when the kernel would not
    /// give random bytes: then no offers).
    secret: Option<[u8; SECRET_LEN]>,
    /// Sender: the receiving process that proved it holds the secret (0: none yet; a
    /// request naming pid 0 is refused before the check).
    proven: AtomicU32,
}

/// A parsed descriptor.
struct Remote {
    pid: i32,
    addr: u64,
    offers_help: bool,
}

impl Pull {
    fn new(config: CmaConfig) -> Self {
        let mut secret = [0u8; SECRET_LEN];
        let secret = match sys::random(&mut secret) {
            Ok(()) => Some(secret),
            Err(e) => {
                tracing::info!(error = %e, "cma: no random bytes; sends will not offer help");
                None
            }
        };
        Self {
            pid: std::process::id(),
            config,
            secret,
            proven: AtomicU32::new(0),
        }
    }

    /// Parses descriptor `d` for a receive of `len` bytes.
    fn parse(d: &[u8], len: usize) -> Result<Remote, ChannelError> {
        let d = TensorDescriptor::decode(d)?;
        if d.length != len as u64 {
            return Err(ChannelError::LengthMismatch {
                expected: len as u64,
                announced: d.length,
            });
        }
        Ok(Remote {
            pid: peer_pid(d.pid)?,
            addr: d.address,
            offers_help: d.secret.is_some(),
        })
    }

    /// Pulls `dst`, the bytes at `addr` of `pid`, on this thread or split across up to
    /// `threads` of ours.
    fn pull(
        &self,
        pid: i32,
        addr: u64,
        dst: &mut [u8],
        threads: usize,
    ) -> Result<(), ChannelError> {
        if dst.len() >= self.config.parallel_from && threads > 1 {
            pull_parallel(pid, addr, dst, threads)
        } else {
            pull(pid, addr, dst)
        }
    }

    /// How many of our threads pull while the sender helps: the sender's core is one of
    /// those [`CmaConfig::threads`] counts.
    fn threads_helped(&self) -> usize {
        self.config.threads.saturating_sub(1).max(1)
    }

    /// Sender: checks that process `pid` holds this channel's secret at `proof`.
    fn prove(&self, pid: i32, proof: u64) -> Result<(), ChannelError> {
        let Some(secret) = self.secret else {
            return Err(ChannelError::protocol("help was not offered"));
        };
        let raw = pid.cast_unsigned();
        if self.proven.load(Ordering::Relaxed) == raw {
            return Ok(());
        }
        let mut seen = [0u8; SECRET_LEN];
        pull(pid, proof, &mut seen)?;
        if seen != secret {
            return Err(ChannelError::protocol(format!(
                "a help request names process {pid}, which does not hold the channel's secret"
            )));
        }
        self.proven.store(raw, Ordering::Relaxed);
        Ok(())
    }
}

impl Fetch for Pull {
    type Held = Box<dyn SendBuf>;

    fn publish(&self, buf: Box<dyn SendBuf>) -> (Vec<u8>, Self::Held) {
        let bytes = buf.bytes();
        let d = TensorDescriptor {
            pid: self.pid,
            address: bytes.as_ptr() as u64,
            length: bytes.len() as u64,
            secret: None,
        };
        (d.encode(), buf)
    }

    fn take_back(&self, held: Self::Held) -> Box<dyn SendBuf> {
        held
    }

    fn abandon(&self, held: Self::Held) {
        // The peer may be pulling these bytes right now; freeing them would let it read
        // reused memory and report success. Leaking one buffer per abandoned send is
        // the safe price.
        tracing::warn!(
            bytes = held.bytes().len(),
            "cma: a send was abandoned mid-flight; its buffer is leaked"
        );
        std::mem::forget(held);
    }

    fn fetch(&self, d: &[u8], dst: &mut dyn RecvBuf) -> Result<(), ChannelError> {
        let dst = dst.bytes_mut();
        let remote = Self::parse(d, dst.len())?;
        self.pull(remote.pid, remote.addr, dst, self.config.threads)
    }

    fn offer_help(&self, held: &Self::Held, queued: bool, descriptor: &mut Vec<u8>) -> bool {
        // Help costs two messages and, for sends queued behind this one, the
        // pipelining of their descriptors: worth it from `help_from` for the last
        // send, from four times that for one with sends behind it.
        let len = held.bytes().len();
        let worth = if queued {
            len / 4 >= self.config.help_from
        } else {
            len >= self.config.help_from
        };
        match self.secret {
            Some(secret) if worth && descriptor.len() == TensorDescriptor::LEN => {
                descriptor.extend_from_slice(&secret);
                true
            }
            _ => false,
        }
    }

    fn ask_help(&self, d: &[u8], dst: &mut dyn RecvBuf) -> Result<Option<Help>, ChannelError> {
        let dst = dst.bytes_mut();
        let remote = Self::parse(d, dst.len())?;
        if !remote.offers_help {
            return Ok(None);
        }
        // The sender takes its even share: half, or one part in `ours + 1` when our
        // share is large enough to split across `ours` threads; from a page boundary.
        let len = dst.len();
        let ours = self.threads_helped();
        let split = len / (ours + 1) * ours;
        let from = if ours > 1 && split >= self.config.parallel_from {
            split
        } else {
            len / 2
        } & !4095;
        if from == 0 {
            return Ok(None);
        }
        let request = HelpRequest {
            pid: self.pid,
            destination: dst.as_mut_ptr() as u64,
            from: from as u64,
            // The secret, where it sits in the descriptor we hold until the answer.
            proof: d.as_ptr() as u64 + TensorDescriptor::LEN as u64,
        }
        .encode();
        Ok(Some(Help { from, request }))
    }

    fn fetch_part(
        &self,
        d: &[u8],
        dst: &mut dyn RecvBuf,
        range: Range<usize>,
    ) -> Result<(), ChannelError> {
        let dst = dst.bytes_mut();
        let remote = Self::parse(d, dst.len())?;
        let start = range.start as u64;
        let part = dst
            .get_mut(range)
            .ok_or_else(|| ChannelError::protocol("a part past the tensor's end"))?;
        self.pull(
            remote.pid,
            remote.addr.wrapping_add(start),
            part,
            self.threads_helped(),
        )
    }

    fn helper_gone(&self, d: &[u8]) -> bool {
        TensorDescriptor::decode(d)
            .ok()
            .and_then(|d| peer_pid(d.pid).ok())
            .is_some_and(process_gone)
    }

    fn help(&self, held: &Self::Held, request: &[u8]) -> Result<(), ChannelError> {
        let HelpRequest {
            pid,
            destination: dst,
            from,
            proof,
        } = HelpRequest::decode(request)?;
        let pid = peer_pid(pid)?;
        let src = held.bytes();
        let part = usize::try_from(from)
            .ok()
            .and_then(|from| src.get(from..))
            .ok_or_else(|| ChannelError::protocol("a help request past the tensor's end"))?;
        self.prove(pid, proof)?;
        push(pid, dst.wrapping_add(from), part)
    }
}

/// Copies `dst.len()` bytes from address `addr` of process `pid` into `dst` with
/// `process_vm_readv`, on this thread, in chunks the kernel accepts — the raw operation
/// the cma channel is built on (`tp bench limits` measures it with this).
///
/// # Errors
/// The OS error (no such process, no permission, an unmapped address), or a read that
/// stops short.
pub fn pull_from(pid: u32, addr: u64, dst: &mut [u8]) -> Result<(), ChannelError> {
    let pid = peer_pid(pid)?;
    pull(pid, addr, dst)
}

/// Pulls `dst.len()` bytes from `addr` of `pid`, in chunks the kernel accepts.
fn pull(pid: i32, addr: u64, dst: &mut [u8]) -> Result<(), ChannelError> {
    let len = dst.len();
    in_chunks("process_vm_readv", len, |done| {
        let rest = dst.get_mut(done..).unwrap_or_default();
        sys::read_remote(pid, addr.wrapping_add(done as u64), rest)
    })
}

/// Runs `step(done)` — one call of `call` that moves what it can from byte `done` on
/// and says how much — until `len` bytes are moved. A call that moves nothing or fails
/// ends it with an error.
fn in_chunks(
    call: &'static str,
    len: usize,
    mut step: impl FnMut(usize) -> std::io::Result<usize>,
) -> Result<(), ChannelError> {
    let mut done = 0usize;
    while done < len {
        let n = step(done).map_err(|e| ChannelError::io(call, e))?;
        if n == 0 {
            return Err(ChannelError::protocol(format!(
                "{call} moved nothing at byte {done} of {len}"
            )));
        }
        done += n;
    }
    Ok(())
}

/// A pid from the peer: 1 to `i32::MAX` (0 would name no process, and is the "none yet"
/// of [`Pull::proven`]).
fn peer_pid(pid: u32) -> Result<i32, ChannelError> {
    i32::try_from(pid)
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| ChannelError::protocol(format!("pid {pid} out of range")))
}

/// Whether process `pid` is gone or a zombie — either way it runs no more code, so
/// writes no more memory. `false` when that cannot be told.
fn process_gone(pid: i32) -> bool {
    let Some(p) = rustix::process::Pid::from_raw(pid) else {
        return false;
    };
    match rustix::process::test_kill_process(p) {
        Err(rustix::io::Errno::SRCH) => true,
        _ => std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                // `pid (comm) state ...`; comm may hold anything but ends at the last ')'.
                stat.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
            })
            .unwrap_or(false),
    }
}

/// Writes `src` to address `addr` of process `pid` with `process_vm_writev`, in chunks
/// the kernel accepts.
fn push(pid: i32, addr: u64, src: &[u8]) -> Result<(), ChannelError> {
    in_chunks("process_vm_writev", src.len(), |done| {
        let rest = src.get(done..).unwrap_or_default();
        sys::write_remote(pid, addr.wrapping_add(done as u64), rest)
    })
}

/// Splits a large pull into pieces that this thread and up to `threads - 1` of the
/// process's copy helpers take in turn (`split`): never slower than pulling alone,
/// faster when a helper is awake.
fn pull_parallel(pid: i32, addr: u64, dst: &mut [u8], threads: usize) -> Result<(), ChannelError> {
    let failed: Mutex<Option<ChannelError>> = Mutex::new(None);
    crate::split::for_each_piece(dst, PIECE, threads, &|off, piece| {
        if let Err(e) = pull(pid, addr.wrapping_add(off as u64), piece) {
            failed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_or_insert(e);
        }
    });
    failed
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
        .map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ChannelContext;

    #[test]
    fn the_probe_runs_for_real_and_names_this_machine_and_user() {
        let ctx = CmaContext::default();
        // This machine allows CMA (platform.md); a machine that does not must say why.
        match ctx.viability() {
            Ok(()) => {
                let d = String::from_utf8(ctx.device_descriptors()[0].1.clone()).unwrap();
                let boot = crate::system::boot_id().unwrap();
                assert!(d.starts_with(&format!("cma:{boot}:pid:[")), "{d}");
                assert!(d.contains(":user:["), "{d}");
                let uid = rustix::process::getuid().as_raw();
                assert!(d.contains(&format!(":{uid}:")), "{d}");
            }
            Err(e) => {
                assert!(ctx.device_descriptors().is_empty());
                eprintln!("SKIPPED: cma not viable here: {e}");
            }
        }
    }

    #[test]
    fn a_pull_checks_the_announced_length_and_the_address() {
        if let Err(why) = probe(&CmaConfig::default()) {
            eprintln!("SKIPPED: cma not viable here: {why}");
            return;
        }
        let fetch = Pull::new(CmaConfig::default());
        let src: Box<dyn SendBuf> = Box::new(vec![7u8; 100]);
        let (d, held) = fetch.publish(src);
        let mut dst = vec![0u8; 99];
        assert!(matches!(
            fetch.fetch(&d, &mut dst),
            Err(ChannelError::LengthMismatch {
                expected: 99,
                announced: 100
            })
        ));
        let mut dst = vec![0u8; 100];
        fetch.fetch(&d, &mut dst).unwrap();
        assert_eq!(dst, vec![7u8; 100]);
        // An address nothing is mapped at: an error, not a crash.
        let mut bad = d.clone();
        bad[4..12].copy_from_slice(&8u64.to_le_bytes());
        assert!(fetch.fetch(&bad, &mut dst).is_err());
        assert!(fetch.fetch(&d[..10], &mut dst).is_err());
        drop(fetch.take_back(held));
    }

    #[test]
    fn a_sender_helps_only_a_receiver_that_proves_it_holds_the_secret() {
        if let Err(why) = probe(&CmaConfig::default()) {
            eprintln!("SKIPPED: cma not viable here: {why}");
            return;
        }
        let config = CmaConfig {
            help_from: 64 << 10,
            ..CmaConfig::default()
        };
        let (sender, receiver) = (Pull::new(config), Pull::new(config));
        let src: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        let (mut small, _) = sender.publish(Box::new(vec![1u8; 1000]));
        assert!(
            !sender.offer_help(&held_len(1000), false, &mut small),
            "too small"
        );
        assert_eq!(small.len(), TensorDescriptor::LEN);
        let (mut d, held) = sender.publish(Box::new(src.clone()));
        assert!(
            !sender.offer_help(&held, true, &mut d),
            "too small with sends behind"
        );
        assert_eq!(d.len(), TensorDescriptor::LEN);
        assert!(sender.offer_help(&held, false, &mut d));
        assert_eq!(d.len(), TensorDescriptor::OFFER_LEN);

        let mut dst = vec![0u8; src.len()];
        let help = receiver.ask_help(&d, &mut dst).unwrap().expect("asks");
        assert_eq!(help.from, 49_152, "half, from a page boundary");
        // A request whose proof points anywhere but at the secret is refused, and
        // nothing is written.
        let mut forged = help.request.clone();
        forged[20..28].copy_from_slice(&(src.as_ptr() as u64).to_le_bytes());
        assert!(matches!(
            sender.help(&held, &forged),
            Err(ChannelError::Protocol(_))
        ));
        assert!(dst.iter().all(|&b| b == 0));
        assert!(sender.help(&held, &help.request[..27]).is_err(), "short");
        let mut pid0 = help.request.clone();
        pid0[..4].copy_from_slice(&0u32.to_le_bytes());
        // Refused as out of range (not by the kernel's "no such process").
        assert!(
            matches!(sender.help(&held, &pid0), Err(ChannelError::Protocol(m)) if m.contains("pid 0")),
            "pid 0 names no process"
        );
        let mut past_end = help.request.clone();
        past_end[12..20].copy_from_slice(&(src.len() as u64 + 1).to_le_bytes());
        assert!(sender.help(&held, &past_end).is_err());
        // The real request: the sender writes the back part, the receiver pulls the
        // front part.
        sender.help(&held, &help.request).unwrap();
        assert!(dst[help.from..] == src[help.from..]);
        assert!(dst[..help.from].iter().all(|&b| b == 0));
        receiver.fetch_part(&d, &mut dst, 0..help.from).unwrap();
        assert!(dst == src);
        // A descriptor that offers nothing is never asked about.
        let (plain, plain_held) = receiver.publish(Box::new(src));
        assert!(receiver.ask_help(&plain, &mut dst).unwrap().is_none());
        drop((sender.take_back(held), plain_held));
    }

    #[test]
    fn a_helper_is_gone_once_its_process_exited_or_is_a_zombie() {
        let fetch = Pull::new(CmaConfig::default());
        let (me, _held) = fetch.publish(Box::new(vec![1u8; 10]));
        assert!(!fetch.helper_gone(&me), "this process is alive");
        let descriptor_of = |pid: u32| {
            TensorDescriptor {
                pid,
                address: 0,
                length: 10,
                secret: None,
            }
            .encode()
        };
        // A child that exited but was not waited for: a zombie.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let d = descriptor_of(child.id());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !fetch.helper_gone(&d) {
            assert!(std::time::Instant::now() < deadline, "never seen as gone");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // Reaped: no such process at all.
        child.wait().unwrap();
        assert!(fetch.helper_gone(&d));
        // What cannot be told is not gone.
        assert!(!fetch.helper_gone(&descriptor_of(0)));
        assert!(!fetch.helper_gone(&me[..5]));
    }

    fn held_len(n: usize) -> Box<dyn SendBuf> {
        Box::new(vec![0u8; n])
    }

    #[test]
    fn a_large_pull_splits_across_threads_and_lands_every_byte() {
        if let Err(why) = probe(&CmaConfig::default()) {
            eprintln!("SKIPPED: cma not viable here: {why}");
            return;
        }
        let src: Vec<u8> = (0..(9 << 20) + 123)
            .map(|i: usize| (i % 251) as u8)
            .collect();
        let mut dst = vec![0u8; src.len()];
        let pid = i32::try_from(std::process::id()).unwrap();
        pull_parallel(pid, src.as_ptr() as u64, &mut dst, 3).unwrap();
        assert!(dst == src);
    }
}
