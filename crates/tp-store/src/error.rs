//! [`StoreError`]: what a store operation can fail with.

use std::string::String;
use std::time::Duration;
use std::vec::Vec;

/// Why a store operation failed. Messages name the key(s) and, for timeouts, how long
/// was waited.
#[non_exhaustive]
#[derive(Debug)]
pub enum StoreError {
    /// The keys did not all appear within the timeout.
    Timeout {
        /// The operation (`get`, `wait`, `queue_pop`, ...).
        op: &'static str,
        /// The keys waited for.
        keys: Vec<String>,
        /// How long was waited.
        waited: Duration,
    },
    /// The store's server could not be reached, or the connection broke.
    Network {
        /// Where.
        addr: String,
        /// What happened.
        reason: String,
    },
    /// A non-blocking pop found the queue empty.
    QueueEmpty {
        /// The queue.
        key: String,
    },
    /// ADD on a value that is not a decimal number (or the sum overflows).
    NotANumber {
        /// The key.
        key: String,
        /// What it holds (up to 64 bytes, lossily as text).
        value: String,
    },
    /// A key, value or key count over the limits.
    TooLarge {
        /// The key the operation was on.
        key: String,
        /// What was too large.
        what: &'static str,
        /// Its size.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// The peer broke the protocol.
    Protocol {
        /// Where.
        addr: String,
        /// What it did.
        reason: String,
    },
    /// A file store's file could not be used.
    Io {
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The backend failed (etcd: what its server answered).
    Backend {
        /// The operation.
        op: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// Arguments that cannot go together (multi_set with unequal lengths, ...).
    InvalidArgument(String),
}

fn keys(keys: &[String]) -> String {
    let mut s = String::new();
    for (i, k) in keys.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        s.push_str(&std::format!("{k:?}"));
    }
    s
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Timeout {
                op,
                keys: k,
                waited,
            } => write!(
                f,
                "{op}: timed out after {:.3} s waiting for key(s) {}",
                waited.as_secs_f64(),
                keys(k)
            ),
            Self::Network { addr, reason } => write!(f, "store at {addr}: {reason}"),
            Self::QueueEmpty { key } => write!(f, "queue {key:?} is empty"),
            Self::NotANumber { key, value } => write!(
                f,
                "add on key {key:?}: its value {value:?} is not a decimal i64 (or the sum overflows)"
            ),
            Self::TooLarge {
                key,
                what,
                len,
                limit,
            } => write!(
                f,
                "key {key:?}: {what} of {len} is over the limit of {limit}"
            ),
            Self::Protocol { addr, reason } => {
                write!(f, "store at {addr} broke the protocol: {reason}")
            }
            Self::Io { path, source } => write!(f, "store file {path}: {source}"),
            Self::Backend { op, reason } => write!(f, "{op}: {reason}"),
            Self::InvalidArgument(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl StoreError {
    /// A timeout error for `keys`.
    pub(crate) fn timeout(op: &'static str, keys: &[&str], waited: Duration) -> Self {
        Self::Timeout {
            op,
            keys: keys.iter().map(|k| (*k).into()).collect(),
            waited,
        }
    }

    /// Whether this is a timeout.
    pub const fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout { .. })
    }
}
