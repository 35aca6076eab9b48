//! PyTorch's TCPStore wire protocol, byte for byte, as a sans-IO codec.
//!
//! Every request is one command byte followed by fields in a fixed layout (there is no
//! frame length, request id or version): integers are little-endian `u32`/`i64`/`u64`,
//! and a string or value is a `u64` length followed by that many bytes. A key list is a
//! `u64` count followed by that many strings. Responses come back in request order, and
//! their layout depends on the command, so a client parses each reply knowing what it
//! asked ([`parse_response`]).
//!
//! Parsing is **incremental and zero-copy**: [`parse_request`] and [`parse_response`]
//! look at the bytes received so far and return `Ok(None)` while a message is
//! incomplete, or the message (borrowing the buffer) and how many bytes it used. Every
//! announced length and count is checked against [`Limits`] as soon as it is read, so a
//! peer announcing 2⁶³ bytes is refused at once instead of being waited for.
//!
//! | # | command | request after the command byte | response |
//! |---|---|---|---|
//! | 0 | VALIDATE | `u32` magic `0x3C85F7CE` | none |
//! | 1 | SET | key, value | none |
//! | 2 | COMPARE_SET | key, expected, desired | value |
//! | 3 | GET | key | value |
//! | 4 | ADD | key, `i64` delta | `i64` |
//! | 5 | CHECK | keys | `u8` 0 ready / 1 not ready |
//! | 6 | WAIT | keys | `u8` 0 stop waiting / 1 canceled |
//! | 7 | GETNUMKEYS | — | `i64` |
//! | 8 | DELETE_KEY | key | `i64` |
//! | 9 | APPEND | key, value | none |
//! | 10 | MULTI_GET | keys | one value per key |
//! | 11 | MULTI_SET | `u64` n, n × (key, value) | none |
//! | 12 | CANCEL_WAIT | — | `u8` 1 (after a possible late `0`) |
//! | 13 | PING | `u32` nonce | the nonce |
//! | 14 | QUEUE_PUSH | key, value | none |
//! | 15 | QUEUE_POP | key | `i64` length before, then the value if it was > 0 |
//! | 16 | QUEUE_LEN | key | `i64` |
//! | 17 | LIST_KEYS | — | `i64` n, n strings |
//! | 18 | BARRIER | key, `i64` world size | `u8` as WAIT |

use core::fmt;

/// VALIDATE's magic number.
pub const VALIDATE_MAGIC: u32 = 0x3C85_F7CE;

/// The command byte.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
#[repr(u8)]
pub enum Command {
    /// Must be a connection's first command.
    Validate = 0,
    /// Stores a value.
    Set = 1,
    /// Stores `desired` if the value is `expected` (c10d semantics).
    CompareSet = 2,
    /// Reads a value.
    Get = 3,
    /// Adds to a decimal counter.
    Add = 4,
    /// Whether keys exist.
    Check = 5,
    /// Waits for keys.
    Wait = 6,
    /// Number of keys.
    GetNumKeys = 7,
    /// Deletes a key.
    DeleteKey = 8,
    /// Appends to a value.
    Append = 9,
    /// Reads several values.
    MultiGet = 10,
    /// Stores several values.
    MultiSet = 11,
    /// Cancels this connection's WAIT.
    CancelWait = 12,
    /// Liveness check.
    Ping = 13,
    /// Pushes onto a queue.
    QueuePush = 14,
    /// Pops from a queue.
    QueuePop = 15,
    /// A queue's length.
    QueueLen = 16,
    /// Every key (2025+ servers).
    ListKeys = 17,
    /// A counting barrier (2025+ servers).
    Barrier = 18,
}

impl Command {
    /// The command for a byte.
    pub const fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0 => Self::Validate,
            1 => Self::Set,
            2 => Self::CompareSet,
            3 => Self::Get,
            4 => Self::Add,
            5 => Self::Check,
            6 => Self::Wait,
            7 => Self::GetNumKeys,
            8 => Self::DeleteKey,
            9 => Self::Append,
            10 => Self::MultiGet,
            11 => Self::MultiSet,
            12 => Self::CancelWait,
            13 => Self::Ping,
            14 => Self::QueuePush,
            15 => Self::QueuePop,
            16 => Self::QueueLen,
            17 => Self::ListKeys,
            18 => Self::Barrier,
            _ => return None,
        })
    }
}

/// Bounds on what a peer may announce.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Limits {
    /// Longest key. PyTorch's server: 8 KiB.
    pub max_key: u64,
    /// Longest value. PyTorch's server: 8 MiB.
    pub max_value: u64,
    /// Most keys in one command. PyTorch's server: 128 Ki.
    pub max_keys: u64,
}

impl Limits {
    /// PyTorch's (libuv) server limits.
    pub const DEFAULT: Self = Self {
        max_key: 8 << 10,
        max_value: 8 << 20,
        max_keys: 128 << 10,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Why bytes were refused. The connection they came on cannot go on.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum ProtoError {
    /// A command byte no version of the protocol defines.
    UnknownCommand(u8),
    /// A length or count over its limit.
    TooLarge {
        /// What was announced.
        what: &'static str,
        /// Announced.
        announced: u64,
        /// The limit.
        limit: u64,
    },
    /// A reply byte with no meaning for its command.
    BadReply {
        /// The command the reply answers.
        command: Command,
        /// The byte.
        byte: u8,
    },
    /// A negative count where a count belongs.
    NegativeCount(i64),
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownCommand(b) => write!(f, "unknown TCPStore command {b}"),
            Self::TooLarge {
                what,
                announced,
                limit,
            } => write!(f, "{what} of {announced} is over the limit of {limit}"),
            Self::BadReply { command, byte } => {
                write!(f, "reply byte {byte} means nothing for {command:?}")
            }
            Self::NegativeCount(n) => write!(f, "negative count {n}"),
        }
    }
}

impl core::error::Error for ProtoError {}

/// A list of strings as it lies in the buffer (already validated).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Strings<'a> {
    count: usize,
    bytes: &'a [u8],
}

impl<'a> Strings<'a> {
    /// How many strings.
    pub const fn len(&self) -> usize {
        self.count
    }

    /// Whether there are none.
    pub const fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The strings, in order.
    pub fn iter(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        let mut rest = self.bytes;
        (0..self.count).map_while(move |_| {
            let (len, tail) = rest.split_first_chunk::<8>()?;
            let len = usize::try_from(u64::from_le_bytes(*len)).ok()?;
            let (s, tail) = tail.split_at_checked(len)?;
            rest = tail;
            Some(s)
        })
    }
}

/// (key, value) pairs as they lie in the buffer (already validated).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Pairs<'a>(Strings<'a>);

impl<'a> Pairs<'a> {
    /// How many pairs.
    pub const fn len(&self) -> usize {
        self.0.count / 2
    }

    /// Whether there are none.
    pub const fn is_empty(&self) -> bool {
        self.0.count == 0
    }

    /// The pairs, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
        let mut it = self.0.iter();
        core::iter::from_fn(move || Some((it.next()?, it.next()?)))
    }
}

/// A request, borrowing the bytes it was parsed from.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Request<'a> {
    /// VALIDATE with its magic (a server checks it is [`VALIDATE_MAGIC`]).
    Validate {
        /// The magic sent.
        magic: u32,
    },
    /// SET.
    Set {
        /// Key.
        key: &'a [u8],
        /// Value.
        value: &'a [u8],
    },
    /// COMPARE_SET.
    CompareSet {
        /// Key.
        key: &'a [u8],
        /// Expected value (empty: "the key must be missing").
        expected: &'a [u8],
        /// Desired value.
        desired: &'a [u8],
    },
    /// GET.
    Get {
        /// Key.
        key: &'a [u8],
    },
    /// ADD.
    Add {
        /// Key.
        key: &'a [u8],
        /// Delta.
        delta: i64,
    },
    /// CHECK.
    Check {
        /// Keys.
        keys: Strings<'a>,
    },
    /// WAIT.
    Wait {
        /// Keys.
        keys: Strings<'a>,
    },
    /// GETNUMKEYS.
    GetNumKeys,
    /// DELETE_KEY.
    DeleteKey {
        /// Key.
        key: &'a [u8],
    },
    /// APPEND.
    Append {
        /// Key.
        key: &'a [u8],
        /// Bytes to append.
        value: &'a [u8],
    },
    /// MULTI_GET.
    MultiGet {
        /// Keys.
        keys: Strings<'a>,
    },
    /// MULTI_SET.
    MultiSet {
        /// Pairs.
        pairs: Pairs<'a>,
    },
    /// CANCEL_WAIT.
    CancelWait,
    /// PING.
    Ping {
        /// Nonce to echo.
        nonce: u32,
    },
    /// QUEUE_PUSH.
    QueuePush {
        /// Queue key.
        key: &'a [u8],
        /// Value.
        value: &'a [u8],
    },
    /// QUEUE_POP.
    QueuePop {
        /// Queue key.
        key: &'a [u8],
    },
    /// QUEUE_LEN.
    QueueLen {
        /// Queue key.
        key: &'a [u8],
    },
    /// LIST_KEYS.
    ListKeys,
    /// BARRIER.
    Barrier {
        /// Counter key.
        key: &'a [u8],
        /// How many must arrive.
        world_size: i64,
    },
}

/// A cursor over received bytes: `Ok(None)` from a read means "not here yet".
struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
    limits: &'a Limits,
}

type Step<T> = Result<Option<T>, ProtoError>;

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.buf.get(self.at..end)?;
        self.at = end;
        Some(s)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N).and_then(|s| s.try_into().ok())
    }

    fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }

    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }

    fn i64(&mut self) -> Option<i64> {
        self.array().map(i64::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }

    /// A length-prefixed string, its length checked before waiting for its bytes.
    fn string(&mut self, what: &'static str, limit: u64) -> Step<&'a [u8]> {
        let Some(len) = self.u64() else {
            return Ok(None);
        };
        if len > limit {
            return Err(ProtoError::TooLarge {
                what,
                announced: len,
                limit,
            });
        }
        let n = usize::try_from(len).map_err(|_| ProtoError::TooLarge {
            what,
            announced: len,
            limit,
        })?;
        Ok(self.take(n))
    }

    fn key(&mut self) -> Step<&'a [u8]> {
        self.string("key length", self.limits.max_key)
    }

    fn value(&mut self) -> Step<&'a [u8]> {
        self.string("value length", self.limits.max_value)
    }

    fn count(&mut self, n: u64) -> Result<usize, ProtoError> {
        if n > self.limits.max_keys {
            return Err(ProtoError::TooLarge {
                what: "key count",
                announced: n,
                limit: self.limits.max_keys,
            });
        }
        usize::try_from(n).map_err(|_| ProtoError::TooLarge {
            what: "key count",
            announced: n,
            limit: self.limits.max_keys,
        })
    }

    /// `count` strings, each checked against `limit`.
    fn strings(&mut self, count: usize, what: &'static str, limit: u64) -> Step<Strings<'a>> {
        let start = self.at;
        for _ in 0..count {
            if self.string(what, limit)?.is_none() {
                return Ok(None);
            }
        }
        Ok(self
            .buf
            .get(start..self.at)
            .map(|bytes| Strings { count, bytes }))
    }

    /// A `u64` count, then that many keys.
    fn keys(&mut self) -> Step<Strings<'a>> {
        let Some(n) = self.u64() else {
            return Ok(None);
        };
        let count = self.count(n)?;
        self.strings(count, "key length", self.limits.max_key)
    }
}

macro_rules! need {
    ($e:expr) => {
        match $e {
            Some(v) => v,
            None => return Ok(None),
        }
    };
}

macro_rules! need_ok {
    ($e:expr) => {
        match $e? {
            Some(v) => v,
            None => return Ok(None),
        }
    };
}

/// Parses one request from the front of `buf`: `Ok(None)` while it is incomplete,
/// else the request and how many bytes it took.
///
/// # Errors
/// [`ProtoError`]: an unknown command or a length over `limits` — possibly before the
/// request is complete.
pub fn parse_request<'a>(buf: &'a [u8], limits: &'a Limits) -> Step<(Request<'a>, usize)> {
    let mut c = Cursor { buf, at: 0, limits };
    let byte = need!(c.u8());
    let cmd = Command::from_byte(byte).ok_or(ProtoError::UnknownCommand(byte))?;
    let req = match cmd {
        Command::Validate => Request::Validate {
            magic: need!(c.u32()),
        },
        Command::Set => Request::Set {
            key: need_ok!(c.key()),
            value: need_ok!(c.value()),
        },
        Command::CompareSet => Request::CompareSet {
            key: need_ok!(c.key()),
            expected: need_ok!(c.value()),
            desired: need_ok!(c.value()),
        },
        Command::Get => Request::Get {
            key: need_ok!(c.key()),
        },
        Command::Add => Request::Add {
            key: need_ok!(c.key()),
            delta: need!(c.i64()),
        },
        Command::Check => Request::Check {
            keys: need_ok!(c.keys()),
        },
        Command::Wait => Request::Wait {
            keys: need_ok!(c.keys()),
        },
        Command::GetNumKeys => Request::GetNumKeys,
        Command::DeleteKey => Request::DeleteKey {
            key: need_ok!(c.key()),
        },
        Command::Append => Request::Append {
            key: need_ok!(c.key()),
            value: need_ok!(c.value()),
        },
        Command::MultiGet => Request::MultiGet {
            keys: need_ok!(c.keys()),
        },
        Command::MultiSet => {
            let n = need!(c.u64());
            let count = c.count(n)?;
            let start = c.at;
            for _ in 0..count {
                need_ok!(c.key());
                need_ok!(c.value());
            }
            let bytes = need!(buf.get(start..c.at));
            // `count` is at most `max_keys`; a limit so large that it doubles past
            // `usize` is refused rather than wrapped.
            let strings = count.checked_mul(2).ok_or(ProtoError::TooLarge {
                what: "key count",
                announced: n,
                limit: limits.max_keys,
            })?;
            Request::MultiSet {
                pairs: Pairs(Strings {
                    count: strings,
                    bytes,
                }),
            }
        }
        Command::CancelWait => Request::CancelWait,
        Command::Ping => Request::Ping {
            nonce: need!(c.u32()),
        },
        Command::QueuePush => Request::QueuePush {
            key: need_ok!(c.key()),
            value: need_ok!(c.value()),
        },
        Command::QueuePop => Request::QueuePop {
            key: need_ok!(c.key()),
        },
        Command::QueueLen => Request::QueueLen {
            key: need_ok!(c.key()),
        },
        Command::ListKeys => Request::ListKeys,
        Command::Barrier => Request::Barrier {
            key: need_ok!(c.key()),
            world_size: need!(c.i64()),
        },
    };
    Ok(Some((req, c.at)))
}

/// A response, borrowing the bytes it was parsed from.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Response<'a> {
    /// COMPARE_SET, GET: a value.
    Value(&'a [u8]),
    /// ADD, GETNUMKEYS, DELETE_KEY, QUEUE_LEN: a number.
    Int(i64),
    /// CHECK: whether every key exists.
    Check {
        /// `true` for READY (0).
        ready: bool,
    },
    /// WAIT, BARRIER, CANCEL_WAIT: `true` for STOP_WAITING (0), `false` for
    /// WAIT_CANCELED (1).
    Wait {
        /// Stopped waiting because the keys arrived.
        stop_waiting: bool,
    },
    /// MULTI_GET: one value per key asked for.
    Values(Strings<'a>),
    /// PING: the nonce echoed.
    Pong(u32),
    /// QUEUE_POP: the length before the pop, and the value if there was one.
    QueuePop {
        /// Length before the pop.
        len_before: i64,
        /// The popped value (present when `len_before > 0`).
        value: Option<&'a [u8]>,
    },
    /// LIST_KEYS.
    Keys(Strings<'a>),
}

/// Whether `cmd` gets a reply at all.
pub const fn has_response(cmd: Command) -> bool {
    !matches!(
        cmd,
        Command::Validate | Command::Set | Command::Append | Command::MultiSet | Command::QueuePush
    )
}

/// Parses the reply to `cmd` from the front of `buf` (`keys` is how many keys a
/// MULTI_GET asked for): `Ok(None)` while incomplete, else the reply and its length.
/// Commands without a reply ([`has_response`]) have nothing to parse and yield
/// `Ok(None)` forever.
///
/// # Errors
/// [`ProtoError`] for a length over `limits` or a status byte with no meaning.
pub fn parse_response<'a>(
    cmd: Command,
    keys: usize,
    buf: &'a [u8],
    limits: &'a Limits,
) -> Step<(Response<'a>, usize)> {
    let mut c = Cursor { buf, at: 0, limits };
    let status = |c: &mut Cursor<'_>| -> Step<bool> {
        match c.u8() {
            None => Ok(None),
            Some(0) => Ok(Some(true)),
            Some(1) => Ok(Some(false)),
            Some(byte) => Err(ProtoError::BadReply { command: cmd, byte }),
        }
    };
    let resp = match cmd {
        Command::Validate
        | Command::Set
        | Command::Append
        | Command::MultiSet
        | Command::QueuePush => return Ok(None),
        Command::CompareSet | Command::Get => Response::Value(need_ok!(c.value())),
        Command::Add | Command::GetNumKeys | Command::DeleteKey | Command::QueueLen => {
            Response::Int(need!(c.i64()))
        }
        Command::Check => Response::Check {
            ready: need_ok!(status(&mut c)),
        },
        Command::Wait | Command::Barrier | Command::CancelWait => Response::Wait {
            stop_waiting: need_ok!(status(&mut c)),
        },
        Command::MultiGet => {
            let count = c.count(keys as u64)?;
            Response::Values(need_ok!(c.strings(count, "value length", limits.max_value)))
        }
        Command::Ping => Response::Pong(need!(c.u32())),
        Command::QueuePop => {
            let len_before = need!(c.i64());
            let value = if len_before > 0 {
                Some(need_ok!(c.value()))
            } else {
                None
            };
            Response::QueuePop { len_before, value }
        }
        Command::ListKeys => {
            let n = need!(c.i64());
            let n = u64::try_from(n).map_err(|_| ProtoError::NegativeCount(n))?;
            let count = c.count(n)?;
            Response::Keys(need_ok!(c.strings(count, "key length", limits.max_key)))
        }
    };
    Ok(Some((resp, c.at)))
}

#[cfg(feature = "alloc")]
pub use encode::{put_string, put_strings};

#[cfg(feature = "alloc")]
mod encode {
    use alloc::vec::Vec;

    use super::{Command, Request, Response};

    /// Appends a string (or value): its `u64` length, then its bytes.
    pub fn put_string(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s);
    }

    /// Appends a list: the `u64` count, then each string (a CHECK, WAIT or MULTI_GET
    /// key list; for MULTI_SET's pairs, pass the count of pairs and the keys and values
    /// interleaved through [`put_string`]).
    pub fn put_strings<'a>(out: &mut Vec<u8>, items: impl IntoIterator<Item = &'a [u8]>) {
        let at = out.len();
        out.extend_from_slice(&0u64.to_le_bytes());
        let mut n = 0u64;
        for s in items {
            put_string(out, s);
            n += 1;
        }
        if let Some(count) = out.get_mut(at..at + 8) {
            count.copy_from_slice(&n.to_le_bytes());
        }
    }

    fn strings<'a>(out: &mut Vec<u8>, n: usize, it: impl Iterator<Item = &'a [u8]>) {
        out.extend_from_slice(&(n as u64).to_le_bytes());
        for s in it {
            put_string(out, s);
        }
    }

    impl Request<'_> {
        /// Its command.
        pub const fn command(&self) -> Command {
            match self {
                Self::Validate { .. } => Command::Validate,
                Self::Set { .. } => Command::Set,
                Self::CompareSet { .. } => Command::CompareSet,
                Self::Get { .. } => Command::Get,
                Self::Add { .. } => Command::Add,
                Self::Check { .. } => Command::Check,
                Self::Wait { .. } => Command::Wait,
                Self::GetNumKeys => Command::GetNumKeys,
                Self::DeleteKey { .. } => Command::DeleteKey,
                Self::Append { .. } => Command::Append,
                Self::MultiGet { .. } => Command::MultiGet,
                Self::MultiSet { .. } => Command::MultiSet,
                Self::CancelWait => Command::CancelWait,
                Self::Ping { .. } => Command::Ping,
                Self::QueuePush { .. } => Command::QueuePush,
                Self::QueuePop { .. } => Command::QueuePop,
                Self::QueueLen { .. } => Command::QueueLen,
                Self::ListKeys => Command::ListKeys,
                Self::Barrier { .. } => Command::Barrier,
            }
        }

        /// Appends the request's bytes to `out`.
        pub fn encode(&self, out: &mut Vec<u8>) {
            out.push(self.command() as u8);
            match *self {
                Self::Validate { magic } => out.extend_from_slice(&magic.to_le_bytes()),
                Self::Ping { nonce } => out.extend_from_slice(&nonce.to_le_bytes()),
                Self::Set { key, value }
                | Self::Append { key, value }
                | Self::QueuePush { key, value } => {
                    put_string(out, key);
                    put_string(out, value);
                }
                Self::CompareSet {
                    key,
                    expected,
                    desired,
                } => {
                    put_string(out, key);
                    put_string(out, expected);
                    put_string(out, desired);
                }
                Self::Get { key }
                | Self::DeleteKey { key }
                | Self::QueuePop { key }
                | Self::QueueLen { key } => put_string(out, key),
                Self::Add { key, delta } => {
                    put_string(out, key);
                    out.extend_from_slice(&delta.to_le_bytes());
                }
                Self::Barrier { key, world_size } => {
                    put_string(out, key);
                    out.extend_from_slice(&world_size.to_le_bytes());
                }
                Self::Check { keys } | Self::Wait { keys } | Self::MultiGet { keys } => {
                    strings(out, keys.len(), keys.iter());
                }
                Self::MultiSet { pairs } => {
                    strings(out, pairs.len(), pairs.iter().flat_map(|(k, v)| [k, v]));
                    // `strings` wrote 2n strings after the count n: exactly the layout.
                }
                Self::GetNumKeys | Self::CancelWait | Self::ListKeys => {}
            }
        }
    }

    impl Response<'_> {
        /// Appends the response's bytes to `out`.
        pub fn encode(&self, out: &mut Vec<u8>) {
            match *self {
                Self::Value(v) => put_string(out, v),
                Self::Int(n) => out.extend_from_slice(&n.to_le_bytes()),
                Self::Check { ready } => out.push(u8::from(!ready)),
                Self::Wait { stop_waiting } => out.push(u8::from(!stop_waiting)),
                Self::Values(vs) => {
                    for v in vs.iter() {
                        put_string(out, v);
                    }
                }
                Self::Pong(n) => out.extend_from_slice(&n.to_le_bytes()),
                Self::QueuePop { len_before, value } => {
                    out.extend_from_slice(&len_before.to_le_bytes());
                    if let Some(v) = value {
                        put_string(out, v);
                    }
                }
                Self::Keys(ks) => {
                    out.extend_from_slice(&(ks.len() as i64).to_le_bytes());
                    for k in ks.iter() {
                        put_string(out, k);
                    }
                }
            }
        }
    }
}

#[cfg(all(test, feature = "alloc"))]
mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;
    use proptest::prelude::*;

    const L: Limits = Limits::DEFAULT;

    fn enc(r: &Request<'_>) -> Vec<u8> {
        let mut v = Vec::new();
        r.encode(&mut v);
        v
    }

    fn keys_of(list: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        for k in list {
            v.extend_from_slice(&(k.len() as u64).to_le_bytes());
            v.extend_from_slice(k);
        }
        v
    }

    /// The byte examples of store-and-agent.md §1.4.
    #[test]
    fn golden_bytes_match_pytorch() {
        assert_eq!(
            enc(&Request::Validate {
                magic: VALIDATE_MAGIC
            }),
            [0x00, 0xCE, 0xF7, 0x85, 0x3C]
        );
        assert_eq!(
            enc(&Request::Set {
                key: b"/k",
                value: b"v"
            }),
            [
                1, 2, 0, 0, 0, 0, 0, 0, 0, 0x2F, 0x6B, 1, 0, 0, 0, 0, 0, 0, 0, 0x76
            ]
        );
        assert_eq!(
            enc(&Request::Add {
                key: b"/c",
                delta: 5
            }),
            [
                4, 2, 0, 0, 0, 0, 0, 0, 0, 0x2F, 0x63, 5, 0, 0, 0, 0, 0, 0, 0
            ]
        );
        let reply = [5u8, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            parse_response(Command::Add, 0, &reply, &L),
            Ok(Some((Response::Int(5), 8)))
        );
        let get_reply = [1u8, 0, 0, 0, 0, 0, 0, 0, 0x35];
        assert_eq!(
            parse_response(Command::Get, 0, &get_reply, &L),
            Ok(Some((Response::Value(b"5"), 9)))
        );
        assert_eq!(
            enc(&Request::Ping { nonce: 0x1234 }),
            [13, 0x34, 0x12, 0, 0]
        );
        assert_eq!(enc(&Request::CancelWait), [12]);
    }

    fn samples<'a>(keys: &'a [u8], pairs: &'a [u8]) -> Vec<Request<'a>> {
        let three = Strings {
            count: 3,
            bytes: keys,
        };
        vec![
            Request::Validate { magic: 7 },
            Request::Set {
                key: b"a",
                value: b"bc",
            },
            Request::CompareSet {
                key: b"k",
                expected: b"",
                desired: b"d",
            },
            Request::Get { key: b"/x" },
            Request::Add {
                key: b"c",
                delta: -3,
            },
            Request::Check { keys: three },
            Request::Wait { keys: three },
            Request::GetNumKeys,
            Request::DeleteKey { key: b"k" },
            Request::Append {
                key: b"k",
                value: b"tail",
            },
            Request::MultiGet { keys: three },
            Request::MultiSet {
                pairs: Pairs(Strings {
                    count: 4,
                    bytes: pairs,
                }),
            },
            Request::CancelWait,
            Request::Ping { nonce: 99 },
            Request::QueuePush {
                key: b"q",
                value: b"item",
            },
            Request::QueuePop { key: b"q" },
            Request::QueueLen { key: b"q" },
            Request::ListKeys,
            Request::Barrier {
                key: b"b",
                world_size: 4,
            },
        ]
    }

    #[test]
    fn every_request_round_trips_and_every_prefix_is_incomplete() {
        let keys = keys_of(&[b"a", b"", b"ccc"]);
        let pairs = keys_of(&[b"k1", b"v1", b"k2", b""]);
        for r in samples(&keys, &pairs) {
            let bytes = enc(&r);
            assert_eq!(
                parse_request(&bytes, &L),
                Ok(Some((r, bytes.len()))),
                "{r:?}"
            );
            for cut in 0..bytes.len() {
                assert_eq!(
                    parse_request(&bytes[..cut], &L),
                    Ok(None),
                    "{r:?} cut {cut}"
                );
            }
            // Followed by more bytes: only its own are consumed.
            let mut more = bytes.clone();
            more.extend_from_slice(&[7, 0, 0]);
            assert_eq!(parse_request(&more, &L), Ok(Some((r, bytes.len()))));
        }
    }

    #[test]
    fn key_lists_and_pairs_iterate_in_order() {
        let keys = keys_of(&[b"a", b"", b"ccc"]);
        let s = Strings {
            count: 3,
            bytes: &keys,
        };
        assert_eq!(s.iter().collect::<Vec<_>>(), [&b"a"[..], b"", b"ccc"]);
        let pairs = keys_of(&[b"k1", b"v1", b"k2", b""]);
        let p = Pairs(Strings {
            count: 4,
            bytes: &pairs,
        });
        assert_eq!(
            p.iter().collect::<Vec<_>>(),
            [(&b"k1"[..], &b"v1"[..]), (&b"k2"[..], &b""[..])]
        );
    }

    #[test]
    fn oversized_announcements_are_refused_before_their_bytes_arrive() {
        // SET with a key length of 2^63: only the 9 bytes of command and length exist.
        let mut b = vec![1u8];
        b.extend_from_slice(&(1u64 << 63).to_le_bytes());
        assert!(matches!(
            parse_request(&b, &L),
            Err(ProtoError::TooLarge {
                what: "key length",
                ..
            })
        ));
        // A value one byte over 8 MiB.
        let mut b = vec![1u8];
        b.extend_from_slice(&1u64.to_le_bytes());
        b.push(b'k');
        b.extend_from_slice(&((8u64 << 20) + 1).to_le_bytes());
        assert!(matches!(
            parse_request(&b, &L),
            Err(ProtoError::TooLarge {
                what: "value length",
                ..
            })
        ));
        // WAIT on 2^40 keys.
        let mut b = vec![6u8];
        b.extend_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(matches!(
            parse_request(&b, &L),
            Err(ProtoError::TooLarge {
                what: "key count",
                ..
            })
        ));
        // MULTI_SET with a count that would wrap when doubled, under a limit that lets it through.
        let huge = Limits {
            max_keys: u64::MAX,
            ..L
        };
        let mut b = vec![11u8];
        b.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse_request(&b, &huge).is_err() || parse_request(&b, &huge) == Ok(None));
        assert_eq!(
            parse_request(&[19], &L),
            Err(ProtoError::UnknownCommand(19))
        );
    }

    #[test]
    fn responses_round_trip_and_bad_status_bytes_are_refused() {
        let vals = keys_of(&[b"x", b"", b"zz"]);
        let names = keys_of(&[b"/a", b"/b"]);
        let cases: Vec<(Command, usize, Response<'_>)> = vec![
            (Command::Get, 0, Response::Value(b"hello")),
            (Command::CompareSet, 0, Response::Value(b"")),
            (Command::GetNumKeys, 0, Response::Int(12)),
            (Command::Check, 2, Response::Check { ready: true }),
            (Command::Check, 2, Response::Check { ready: false }),
            (Command::Wait, 1, Response::Wait { stop_waiting: true }),
            (
                Command::CancelWait,
                0,
                Response::Wait {
                    stop_waiting: false,
                },
            ),
            (
                Command::MultiGet,
                3,
                Response::Values(Strings {
                    count: 3,
                    bytes: &vals,
                }),
            ),
            (Command::Ping, 0, Response::Pong(0xdead_beef)),
            (
                Command::QueuePop,
                0,
                Response::QueuePop {
                    len_before: 0,
                    value: None,
                },
            ),
            (
                Command::QueuePop,
                0,
                Response::QueuePop {
                    len_before: 2,
                    value: Some(b"item"),
                },
            ),
            (
                Command::ListKeys,
                0,
                Response::Keys(Strings {
                    count: 2,
                    bytes: &names,
                }),
            ),
        ];
        for (cmd, keys, resp) in cases {
            let mut bytes = Vec::new();
            resp.encode(&mut bytes);
            assert_eq!(
                parse_response(cmd, keys, &bytes, &L),
                Ok(Some((resp, bytes.len()))),
                "{cmd:?}"
            );
            for cut in 0..bytes.len() {
                assert_eq!(parse_response(cmd, keys, &bytes[..cut], &L), Ok(None));
            }
        }
        assert_eq!(
            parse_response(Command::Wait, 0, &[2], &L),
            Err(ProtoError::BadReply {
                command: Command::Wait,
                byte: 2
            })
        );
        assert_eq!(
            parse_response(Command::ListKeys, 0, &(-1i64).to_le_bytes(), &L),
            Err(ProtoError::NegativeCount(-1))
        );
        assert_eq!(parse_response(Command::Set, 0, &[0, 1, 2], &L), Ok(None));
        assert!(!has_response(Command::Set) && has_response(Command::Get));
    }

    proptest! {
        /// Peer bytes never panic; what parses re-encodes to exactly the bytes used.
        #[test]
        fn arbitrary_bytes_never_panic_and_parsed_requests_reencode(
            bytes in proptest::collection::vec(any::<u8>(), 0..256),
            first in 0u8..20,
        ) {
            let mut b = vec![first];
            b.extend_from_slice(&bytes);
            let small = Limits { max_key: 64, max_value: 128, max_keys: 8 };
            if let Ok(Some((req, used))) = parse_request(&b, &small) {
                prop_assert_eq!(enc(&req), b[..used].to_vec());
            }
        }

        #[test]
        fn arbitrary_replies_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..128),
            cmd in 0u8..19,
            keys in 0usize..4,
        ) {
            let cmd = Command::from_byte(cmd).unwrap();
            let _ = parse_response(cmd, keys, &bytes, &L);
        }
    }
}
