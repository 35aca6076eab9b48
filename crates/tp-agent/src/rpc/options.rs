//! [`AgentOptions`]: what an RPC agent is told, checked before anything starts.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use tp_channel::Device;

/// The longest worker name (PyTorch's limit).
pub const MAX_NAME_LEN: usize = 128;

/// An RPC agent's options, with PyTorch's defaults
/// (`TensorPipeRpcBackendOptions`): 16 worker threads, a 60 s timeout, every viable
/// transport and channel at the default priorities, no device maps.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentOptions {
    /// This worker's name: letters, digits, `_`, `-`, `:` and `.`, at most
    /// [`MAX_NAME_LEN`] bytes; unique in the group.
    pub name: String,
    /// This worker's rank, unique in the group (below `world_size` when that is given).
    pub rank: u32,
    /// The group's size: given, a static group (everyone joins at once); `None`, a
    /// dynamic group (workers join and leave while others run).
    pub world_size: Option<u32>,
    /// Threads running request handlers (> 0).
    pub num_worker_threads: usize,
    /// The timeout of a call made without one (zero: never).
    pub rpc_timeout: Duration,
    /// Transports to use, first = preferred (overriding the default priorities);
    /// `None`: every viable one.
    pub transports: Option<Vec<String>>,
    /// Channels to use, first = preferred; `None`: every viable one.
    pub channels: Option<Vec<String>>,
    /// Per peer name: which local device's tensors go to which of the peer's devices.
    pub device_maps: BTreeMap<String, BTreeMap<Device, Device>>,
    /// The local devices this agent may use (empty: those the maps name).
    pub devices: Vec<Device>,
    /// The host (IP address or name) to listen on and publish for tcp; `None`: guessed
    /// as the transport does (`TP_SOCKET_IFNAME`, the host name, else 127.0.0.1 with a
    /// warning).
    pub address: Option<String>,
    /// The largest message (payload and tensors together) this agent accepts; a peer
    /// that announces a larger one has its pipe closed before anything is allocated.
    pub max_message_bytes: u64,
}

/// [`AgentOptions::max_message_bytes`]' default: 64 GiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 64 << 30;

impl AgentOptions {
    /// PyTorch's defaults for worker `name` at `rank` of a dynamic group.
    pub fn new(name: impl Into<String>, rank: u32) -> Self {
        Self {
            name: name.into(),
            rank,
            world_size: None,
            num_worker_threads: 16,
            rpc_timeout: Duration::from_secs(60),
            transports: None,
            channels: None,
            device_maps: BTreeMap::new(),
            devices: Vec::new(),
            address: None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }

    /// Checks every option. `transports` and `channels` are the names this build
    /// knows; `local` the devices this machine has.
    ///
    /// # Errors
    /// The first [`OptionsError`] found.
    pub fn validate(
        &self,
        transports: &[&str],
        channels: &[&str],
        local: &[Device],
    ) -> Result<(), OptionsError> {
        validate_name(&self.name)?;
        if let Some(n) = self.world_size {
            if n == 0 {
                return Err(OptionsError::EmptyGroup);
            }
            if self.rank >= n {
                return Err(OptionsError::RankOutOfRange {
                    rank: self.rank,
                    world_size: n,
                });
            }
        }
        if self.num_worker_threads == 0 {
            return Err(OptionsError::NoWorkerThreads);
        }
        for (list, known, kind) in [
            (&self.transports, transports, "transport"),
            (&self.channels, channels, "channel"),
        ] {
            let Some(list) = list else { continue };
            if list.is_empty() {
                return Err(OptionsError::EmptyList { kind });
            }
            for (i, name) in list.iter().enumerate() {
                if !known.contains(&name.as_str()) {
                    return Err(OptionsError::Unknown {
                        kind,
                        name: name.clone(),
                        known: known.iter().map(|s| (*s).to_string()).collect(),
                    });
                }
                if list.get(..i).is_some_and(|before| before.contains(name)) {
                    return Err(OptionsError::Repeated {
                        kind,
                        name: name.clone(),
                    });
                }
            }
        }
        for d in &self.devices {
            if !local.contains(d) {
                return Err(OptionsError::NoSuchDevice {
                    device: *d,
                    why: "listed in `devices`".into(),
                });
            }
        }
        for (peer, map) in &self.device_maps {
            validate_name(peer).map_err(|_| OptionsError::BadPeerName(peer.clone()))?;
            if *peer == self.name {
                return Err(OptionsError::MapToSelf(peer.clone()));
            }
            let mut targets: BTreeMap<Device, Device> = BTreeMap::new();
            for (&from, &to) in map {
                if !local.contains(&from) {
                    return Err(OptionsError::NoSuchDevice {
                        device: from,
                        why: format!("the source of a device map to {peer:?}"),
                    });
                }
                if !self.devices.is_empty() && !self.devices.contains(&from) {
                    return Err(OptionsError::NoSuchDevice {
                        device: from,
                        why: format!(
                            "the source of a device map to {peer:?}, but not in `devices`"
                        ),
                    });
                }
                if let Some(&other) = targets.get(&to) {
                    return Err(OptionsError::DuplicateTarget {
                        peer: peer.clone(),
                        target: to,
                        sources: (other, from),
                    });
                }
                targets.insert(to, from);
            }
        }
        Ok(())
    }

    /// The reverse of the map to `peer`: for responses, which local device a tensor
    /// from the peer's device lands on. Maps are one-to-one once validated.
    pub fn reverse_map(&self, peer: &str) -> BTreeMap<Device, Device> {
        self.device_maps
            .get(peer)
            .map(|m| m.iter().map(|(&from, &to)| (to, from)).collect())
            .unwrap_or_default()
    }
}

fn validate_name(name: &str) -> Result<(), OptionsError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '.');
    if name.is_empty() || name.len() > MAX_NAME_LEN || !name.chars().all(ok_char) {
        return Err(OptionsError::BadName(name.to_string()));
    }
    Ok(())
}

/// Why options were refused.
#[non_exhaustive]
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum OptionsError {
    /// The worker name is empty, too long or has other characters than letters,
    /// digits, `_`, `-`, `:` and `.`.
    BadName(String),
    /// A device map names a peer that cannot be a worker name.
    BadPeerName(String),
    /// `world_size` of 0.
    EmptyGroup,
    /// `rank` not below `world_size`.
    RankOutOfRange {
        /// The rank.
        rank: u32,
        /// The group size.
        world_size: u32,
    },
    /// `num_worker_threads` of 0.
    NoWorkerThreads,
    /// An empty transport or channel list (use `None` for "all").
    EmptyList {
        /// `transport` or `channel`.
        kind: &'static str,
    },
    /// A transport or channel this build does not know.
    Unknown {
        /// `transport` or `channel`.
        kind: &'static str,
        /// The name given.
        name: String,
        /// The names known.
        known: Vec<String>,
    },
    /// A name listed twice.
    Repeated {
        /// `transport` or `channel`.
        kind: &'static str,
        /// The name.
        name: String,
    },
    /// A device this machine does not have (or the options do not allow).
    NoSuchDevice {
        /// The device.
        device: Device,
        /// Where it was named.
        why: String,
    },
    /// Two local devices mapped to one device of a peer.
    DuplicateTarget {
        /// The peer.
        peer: String,
        /// The device both map to.
        target: Device,
        /// The two local devices.
        sources: (Device, Device),
    },
    /// A device map to the worker itself.
    MapToSelf(String),
}

impl fmt::Display for OptionsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadName(n) => write!(
                f,
                "worker name {n:?} must be 1 to {MAX_NAME_LEN} letters, digits, '_', '-', ':' or '.'"
            ),
            Self::BadPeerName(n) => write!(f, "device map for {n:?}: not a valid worker name"),
            Self::EmptyGroup => f.write_str("world_size must be at least 1"),
            Self::RankOutOfRange { rank, world_size } => {
                write!(f, "rank {rank} is out of range for world_size {world_size}")
            }
            Self::NoWorkerThreads => f.write_str("num_worker_threads must be positive"),
            Self::EmptyList { kind } => {
                write!(
                    f,
                    "an empty {kind} list leaves nothing to use (None means all)"
                )
            }
            Self::Unknown { kind, name, known } => {
                write!(f, "unknown {kind} {name:?} (known: {})", known.join(", "))
            }
            Self::Repeated { kind, name } => write!(f, "{kind} {name:?} is listed twice"),
            Self::NoSuchDevice { device, why } => {
                write!(f, "device {device} does not exist here ({why})")
            }
            Self::DuplicateTarget {
                peer,
                target,
                sources,
            } => write!(
                f,
                "device map to {peer:?}: {} and {} both map to {target}; a map must be one-to-one",
                sources.0, sources.1
            ),
            Self::MapToSelf(n) => write!(f, "a device map to the worker itself ({n:?})"),
        }
    }
}

impl std::error::Error for OptionsError {}

#[cfg(test)]
mod tests {
    use super::*;
    use tp_wire::DeviceKind;

    const T: &[&str] = &["shm", "tcp"];
    const C: &[&str] = &["cma", "mpt", "basic", "xth"];

    fn cuda(i: u32) -> Device {
        Device {
            kind: DeviceKind::Cuda,
            index: i,
        }
    }

    fn check(o: &AgentOptions) -> Result<(), OptionsError> {
        o.validate(T, C, &[Device::CPU, cuda(0), cuda(1)])
    }

    #[test]
    fn defaults_are_pytorchs_and_valid() {
        let o = AgentOptions::new("worker0", 0);
        assert_eq!(o.num_worker_threads, 16);
        assert_eq!(o.rpc_timeout, Duration::from_secs(60));
        assert_eq!(o.world_size, None);
        check(&o).unwrap();
    }

    #[test]
    fn bad_options_are_refused_with_what_is_wrong() {
        let base = AgentOptions::new("w", 0);
        let cases: Vec<(AgentOptions, &str)> = vec![
            (AgentOptions::new("", 0), "worker name \"\""),
            (AgentOptions::new("has space", 0), "\"has space\""),
            (AgentOptions::new("x".repeat(129), 0), "1 to 128"),
            (
                AgentOptions {
                    world_size: Some(2),
                    rank: 2,
                    ..base.clone()
                },
                "rank 2 is out of range for world_size 2",
            ),
            (
                AgentOptions {
                    world_size: Some(0),
                    ..base.clone()
                },
                "at least 1",
            ),
            (
                AgentOptions {
                    num_worker_threads: 0,
                    ..base.clone()
                },
                "num_worker_threads must be positive",
            ),
            (
                AgentOptions {
                    transports: Some(vec!["uv".into()]),
                    ..base.clone()
                },
                "unknown transport \"uv\" (known: shm, tcp)",
            ),
            (
                AgentOptions {
                    channels: Some(vec!["basic".into(), "basic".into()]),
                    ..base.clone()
                },
                "channel \"basic\" is listed twice",
            ),
            (
                AgentOptions {
                    channels: Some(vec![]),
                    ..base.clone()
                },
                "empty channel list",
            ),
            (
                AgentOptions {
                    devices: vec![cuda(7)],
                    ..base.clone()
                },
                "device cuda:7 does not exist here",
            ),
            (
                AgentOptions {
                    device_maps: BTreeMap::from([(
                        "peer".into(),
                        BTreeMap::from([(cuda(0), cuda(0)), (cuda(1), cuda(0))]),
                    )]),
                    ..base.clone()
                },
                "cuda:0 and cuda:1 both map to cuda:0",
            ),
            (
                AgentOptions {
                    device_maps: BTreeMap::from([(
                        "w".into(),
                        BTreeMap::from([(cuda(0), cuda(0))]),
                    )]),
                    ..base.clone()
                },
                "to the worker itself",
            ),
            (
                AgentOptions {
                    devices: vec![cuda(1)],
                    device_maps: BTreeMap::from([(
                        "peer".into(),
                        BTreeMap::from([(cuda(0), cuda(0))]),
                    )]),
                    ..base
                },
                "not in `devices`",
            ),
        ];
        for (o, want) in cases {
            let err = check(&o).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
    }

    #[test]
    fn reverse_maps_send_responses_back_where_requests_came_from() {
        let o = AgentOptions {
            device_maps: BTreeMap::from([(
                "peer".into(),
                BTreeMap::from([(cuda(0), cuda(1)), (Device::CPU, Device::CPU)]),
            )]),
            ..AgentOptions::new("w", 0)
        };
        check(&o).unwrap();
        let rev = o.reverse_map("peer");
        assert_eq!(rev.get(&cuda(1)), Some(&cuda(0)));
        assert_eq!(rev.get(&Device::CPU), Some(&Device::CPU));
        assert!(o.reverse_map("other").is_empty());
    }
}
