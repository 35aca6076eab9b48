//! Transport and channel selection: a pure function of the two offers.
//!
//! Both sides run [`negotiate`] on the same inputs — the client's brochure as sent and
//! the server's offer as carried in the answer — so they reach the same choice; the
//! client checks the server's answer against its own result instead of trusting it
//! (the original asserted and crashed on a mismatch).
//!
//! **Rules.** Candidates are ranked by the *server's* priority (higher first), ties
//! broken by name so the order is total.
//! - Transport: the first server transport the client also offers with a byte-equal
//!   domain descriptor.
//! - Channels: for each server channel in rank order that the client also offers, every
//!   (server device, client device) pair whose descriptors are byte-equal and that no
//!   earlier channel took is assigned to it. A channel that got at least one pair is
//!   *selected*; selected channels keep rank order.
//!
//! Channel compatibility is byte equality of descriptors by default: a backend puts into
//! its descriptor everything two ends must share (boot id, namespaces, lane count...).
//! A channel whose rule is not equality ("the same machine but *another* process",
//! "not both ends on the CPU") is judged by the rule given to [`negotiate_with`], which
//! both ends must apply identically: a pure, symmetric function of the two descriptors.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use crate::device::Device;
use crate::packet::{BrochureRepr, ChannelOffer, OwnedDevicePairChoice, Seq, TransportOffer};

/// The outcome of a negotiation.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Selection {
    /// The chosen transport.
    pub transport: String,
    /// The selected channels, in rank order.
    pub channels: Vec<String>,
    /// The channel for each (server device, client device) pair, sorted by pair.
    pub pairs: Vec<OwnedDevicePairChoice>,
}

/// Why no selection could be made.
#[non_exhaustive]
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum NegotiationError {
    /// The two sides share no transport.
    NoCommonTransport,
    /// The two sides share no protocol version.
    NoCommonVersion {
        /// The client's range.
        client: (u8, u8),
        /// The server's range.
        server: (u8, u8),
    },
    /// An offer names the same transport or channel twice, or a device twice in a channel.
    DuplicateEntry(String),
}

impl fmt::Display for NegotiationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoCommonTransport => f.write_str("the two sides share no transport"),
            Self::NoCommonVersion { client, server } => write!(
                f,
                "no common protocol version: client speaks {}..={}, server {}..={}",
                client.0, client.1, server.0, server.1
            ),
            Self::DuplicateEntry(name) => write!(f, "offer lists {name} twice"),
        }
    }
}

impl core::error::Error for NegotiationError {}

/// Picks the protocol version: the highest both ranges contain.
///
/// # Errors
/// [`NegotiationError::NoCommonVersion`].
pub fn negotiate_version(client: (u8, u8), server: (u8, u8)) -> Result<u8, NegotiationError> {
    let v = client.1.min(server.1);
    if v >= client.0 && v >= server.0 {
        Ok(v)
    } else {
        Err(NegotiationError::NoCommonVersion { client, server })
    }
}

fn ranked<'a, T: Copy>(
    items: impl Iterator<Item = T>,
    key: impl Fn(&T) -> (i64, &'a str),
) -> Result<Vec<T>, NegotiationError> {
    let mut v: Vec<T> = items.collect();
    v.sort_by(|a, b| {
        let (pa, na) = key(a);
        let (pb, nb) = key(b);
        pb.cmp(&pa).then_with(|| na.cmp(nb))
    });
    let mut seen = BTreeSet::new();
    for item in &v {
        let name = key(item).1;
        if !seen.insert(name) {
            return Err(NegotiationError::DuplicateEntry(name.to_string()));
        }
    }
    Ok(v)
}

fn unique_names<'a>(names: impl Iterator<Item = &'a str>) -> Result<(), NegotiationError> {
    let mut seen = BTreeSet::new();
    for n in names {
        if !seen.insert(n) {
            return Err(NegotiationError::DuplicateEntry(n.to_string()));
        }
    }
    Ok(())
}

/// Selects the transport and the channel of every device pair.
///
/// `server_transports` must hold only transports the server listens on.
///
/// # Errors
/// [`NegotiationError::NoCommonTransport`], or [`NegotiationError::DuplicateEntry`] for a
/// malformed offer.
pub fn negotiate(
    client: &BrochureRepr<'_>,
    server_transports: &Seq<'_, TransportOffer<'_>>,
    server_channels: &Seq<'_, ChannelOffer<'_>>,
) -> Result<Selection, NegotiationError> {
    negotiate_with(client, server_transports, server_channels, &|_, s, c| {
        s == c
    })
}

/// Decides whether a channel's descriptors on two devices work together:
/// `(channel name, server's descriptor, client's descriptor)`. Both ends of a pipe
/// run it on the same inputs, so it must be a pure function of them, and symmetric.
pub type Compatible = dyn Fn(&str, &[u8], &[u8]) -> bool + Send + Sync;

/// [`negotiate`] with channel descriptors judged by `compatible` instead of byte
/// equality.
///
/// # Errors
/// As [`negotiate`].
pub fn negotiate_with(
    client: &BrochureRepr<'_>,
    server_transports: &Seq<'_, TransportOffer<'_>>,
    server_channels: &Seq<'_, ChannelOffer<'_>>,
    compatible: &Compatible,
) -> Result<Selection, NegotiationError> {
    unique_names(client.transports.iter().map(|t| t.name))?;
    unique_names(client.channels.iter().map(|c| c.name))?;
    let transports = ranked(server_transports.iter(), |t| (t.priority, t.name))?;
    let transport = transports
        .iter()
        .find(|s| {
            client
                .transports
                .iter()
                .any(|c| c.name == s.name && c.domain_descriptor == s.domain_descriptor)
        })
        .ok_or(NegotiationError::NoCommonTransport)?
        .name
        .to_string();

    let channels = ranked(server_channels.iter(), |c| (c.priority, c.name))?;
    let mut taken: BTreeMap<(Device, Device), String> = BTreeMap::new();
    let mut selected = Vec::new();
    for s in &channels {
        unique_names_devices(s)?;
        let Some(c) = client.channels.iter().find(|c| c.name == s.name) else {
            continue;
        };
        unique_names_devices(&c)?;
        let mut got_one = false;
        for sd in s.devices.iter() {
            for cd in c.devices.iter() {
                if !taken.contains_key(&(sd.device, cd.device))
                    && compatible(s.name, sd.descriptor, cd.descriptor)
                {
                    taken.insert((sd.device, cd.device), s.name.to_string());
                    got_one = true;
                }
            }
        }
        if got_one {
            selected.push(s.name.to_string());
        }
    }
    let pairs = taken
        .into_iter()
        .map(
            |((server_device, client_device), channel)| OwnedDevicePairChoice {
                server_device,
                client_device,
                channel,
            },
        )
        .collect();
    Ok(Selection {
        transport,
        channels: selected,
        pairs,
    })
}

fn unique_names_devices(c: &ChannelOffer<'_>) -> Result<(), NegotiationError> {
    let mut seen = BTreeSet::new();
    for d in c.devices.iter() {
        if !seen.insert(d.device) {
            return Err(NegotiationError::DuplicateEntry(alloc::format!(
                "device {} of channel {}",
                d.device,
                c.name
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::DeviceDescriptor;

    fn t(name: &'static str, priority: i64, d: &'static [u8]) -> TransportOffer<'static> {
        TransportOffer {
            name,
            priority,
            domain_descriptor: d,
        }
    }

    #[test]
    fn negotiate_prefers_server_priority_with_equal_descriptors() {
        let ct = [t("tcp", 0, b""), t("shm", 200, b"boot-a")];
        let st_same = [t("tcp", 0, b""), t("shm", 200, b"boot-a")];
        let st_other = [t("tcp", 0, b""), t("shm", 200, b"boot-b")];
        let client = BrochureRepr {
            min_version: 1,
            max_version: 1,
            transports: Seq::Slice(&ct),
            channels: Seq::Slice(&[]),
        };
        let none = Seq::Slice(&[]);
        assert_eq!(
            negotiate(&client, &Seq::Slice(&st_same), &none)
                .unwrap()
                .transport,
            "shm"
        );
        assert_eq!(
            negotiate(&client, &Seq::Slice(&st_other), &none)
                .unwrap()
                .transport,
            "tcp"
        );
        assert_eq!(
            negotiate(&client, &Seq::Slice(&[t("ibv", 1, b"")]), &none),
            Err(NegotiationError::NoCommonTransport)
        );
    }

    #[test]
    fn negotiate_assigns_each_pair_to_highest_ranked_compatible_channel() {
        let cpu = [DeviceDescriptor {
            device: Device::CPU,
            descriptor: b"host-1",
        }];
        let cpu_any = [DeviceDescriptor {
            device: Device::CPU,
            descriptor: b"any",
        }];
        let gpu = [
            DeviceDescriptor {
                device: Device::cuda(0),
                descriptor: b"g",
            },
            DeviceDescriptor {
                device: Device::cuda(1),
                descriptor: b"g",
            },
        ];
        let chans = [
            ChannelOffer {
                name: "basic",
                priority: 1000,
                devices: Seq::Slice(&cpu_any),
            },
            ChannelOffer {
                name: "cma",
                priority: 1200,
                devices: Seq::Slice(&cpu),
            },
            ChannelOffer {
                name: "cuda_ipc",
                priority: 300,
                devices: Seq::Slice(&gpu),
            },
        ];
        let tr = [t("tcp", 0, b"")];
        let client = BrochureRepr {
            min_version: 1,
            max_version: 1,
            transports: Seq::Slice(&tr),
            channels: Seq::Slice(&chans),
        };
        let sel = negotiate(&client, &Seq::Slice(&tr), &Seq::Slice(&chans)).unwrap();
        assert_eq!(sel.channels, ["cma", "cuda_ipc"]);
        assert_eq!(sel.pairs.len(), 5);
        assert_eq!(sel.pairs[0].channel, "cma");
        assert!(sel.pairs[1..].iter().all(|p| p.channel == "cuda_ipc"));
    }

    #[test]
    fn a_custom_rule_decides_channel_pairs_and_equality_no_longer_does() {
        // A rule like cuda_ipc's: same machine ("m1"), another process (after the '/').
        let server = [DeviceDescriptor {
            device: Device::cuda(0),
            descriptor: b"m1/pid-1",
        }];
        let same_process = [DeviceDescriptor {
            device: Device::cuda(0),
            descriptor: b"m1/pid-1",
        }];
        let other_process = [DeviceDescriptor {
            device: Device::cuda(0),
            descriptor: b"m1/pid-2",
        }];
        fn run(client: &[DeviceDescriptor<'_>], server: &[DeviceDescriptor<'_>]) -> (usize, usize) {
            let offer = |devices| ChannelOffer {
                name: "ipc",
                priority: 1,
                devices,
            };
            let rule = |name: &str, s: &[u8], c: &[u8]| {
                assert_eq!(name, "ipc");
                s.split(|&b| b == b'/').next() == c.split(|&b| b == b'/').next() && s != c
            };
            let tr = [t("tcp", 0, b"")];
            let chans = [offer(Seq::Slice(client))];
            let brochure = BrochureRepr {
                min_version: 1,
                max_version: 1,
                transports: Seq::Slice(&tr),
                channels: Seq::Slice(&chans),
            };
            let server_chans = [offer(Seq::Slice(server))];
            let (tr, sc) = (Seq::Slice(&tr), Seq::Slice(&server_chans));
            let custom = negotiate_with(&brochure, &tr, &sc, &rule).unwrap();
            let equal = negotiate(&brochure, &tr, &sc).unwrap();
            (custom.pairs.len(), equal.pairs.len())
        }
        assert_eq!(run(&other_process, &server), (1, 0));
        assert_eq!(run(&same_process, &server), (0, 1));
    }

    #[test]
    fn negotiate_duplicate_transport_rejected() {
        let ct = [t("tcp", 0, b""), t("tcp", 1, b"")];
        let client = BrochureRepr {
            min_version: 1,
            max_version: 1,
            transports: Seq::Slice(&ct),
            channels: Seq::Slice(&[]),
        };
        assert!(matches!(
            negotiate(&client, &Seq::Slice(&ct[..1]), &Seq::Slice(&[])),
            Err(NegotiationError::DuplicateEntry(_))
        ));
    }

    #[test]
    fn version_picks_highest_common() {
        assert_eq!(negotiate_version((1, 3), (1, 2)), Ok(2));
        assert!(negotiate_version((3, 4), (1, 2)).is_err());
    }
}
