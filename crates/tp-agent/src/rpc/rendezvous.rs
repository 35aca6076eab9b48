//! Finding the group through a [`Store`], with PyTorch's key layout so that the keys
//! read the same to anyone debugging a job (`tp store get ...`).
//!
//! Keys, under the prefix the caller's store adds (PyTorch: `rpc_prefix_<n>/`):
//!
//! | key | value |
//! |---|---|
//! | `rpcIsStaticGroup` | `true` / `false`, compare-and-set from empty: every worker must agree |
//! | `names/<rank>` | the worker name, compare-and-set from empty: a rank is claimed once |
//! | `names/_ALL_WORKER_INFOS` | dynamic groups: `name-rank,` per member |
//! | `addrs/<name>` | the URL the worker listens on |
//! | `RpcGroupManagementToken` | dynamic groups: `Token_for_<name>_join` while one joins or leaves |
//! | `Token_for_<name>_<op>` | `Done` once that join or leave is over |
//! | `shutdown/ACTIVE_CALLS_ID_<k>` | the call-count barrier's round `k`: the sum of every worker's calls in flight |
//! | `shutdown/PROCESS_COUNT_ID_<k>` | round `k`: how many workers have arrived |
//! | `shutdown/READY_ID_<k>` | round `k`: set by the last worker to arrive |

use std::collections::BTreeMap;
use std::fmt;
use std::time::Instant;

use tp_store::{Store, StoreError};

use super::AgentOptions;

const IS_STATIC: &str = "rpcIsStaticGroup";
const ALL: &str = "names/_ALL_WORKER_INFOS";
const TOKEN: &str = "RpcGroupManagementToken";

/// The group as this worker found it.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Group {
    /// Rank → worker name, everyone's (this worker's included).
    pub names: BTreeMap<u32, String>,
    /// Worker name → the URL it listens on.
    pub addrs: BTreeMap<String, String>,
}

/// Why joining failed.
#[non_exhaustive]
#[derive(Debug)]
pub enum RendezvousError {
    /// The store failed (a timeout names the keys and the time waited).
    Store(StoreError),
    /// Some workers were given a world size and others not.
    MixedGroup,
    /// Two workers with one name.
    DuplicateName {
        /// The name.
        name: String,
        /// Their ranks.
        ranks: (u32, u32),
    },
    /// Two workers with one rank.
    DuplicateRank {
        /// The rank.
        rank: u32,
        /// The worker that had it, and the one that asked for it.
        names: (String, String),
    },
}

impl fmt::Display for RendezvousError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Store(e) => write!(f, "rendezvous: {e}"),
            Self::MixedGroup => f.write_str(
                "RPC group mixes statically and dynamically initialized members, which is not supported",
            ),
            Self::DuplicateName { name, ranks } => write!(
                f,
                "RPC worker name {name:?} is not unique: workers of rank {} and {} share it",
                ranks.0, ranks.1
            ),
            Self::DuplicateRank { rank, names } => write!(
                f,
                "RPC worker rank {rank} is not unique: {:?} has it and {:?} asked for it",
                names.0, names.1
            ),
        }
    }
}

impl std::error::Error for RendezvousError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Store(e) => Some(e),
            _ => None,
        }
    }
}

impl From<StoreError> for RendezvousError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

fn text(v: Vec<u8>) -> String {
    String::from_utf8_lossy(&v).into_owned()
}

/// Joins the group: checks that everyone agrees on static or dynamic, claims this
/// rank, publishes `url` as this worker's address, and reads everyone's names and
/// addresses (a static group waits for all `world_size` workers, up to the store's
/// timeout; a dynamic one reads those who joined before, under the membership token).
///
/// # Errors
/// [`RendezvousError`]: a mixed group, a duplicate name or rank (naming both workers),
/// or the store's error.
pub fn join(store: &dyn Store, opts: &AgentOptions, url: &str) -> Result<Group, RendezvousError> {
    let want = if opts.world_size.is_some() {
        "true"
    } else {
        "false"
    };
    if text(store.compare_set(IS_STATIC, b"", want.as_bytes())?) != want {
        return Err(RendezvousError::MixedGroup);
    }
    match opts.world_size {
        Some(n) => join_static(store, opts, n, url),
        None => with_token(store, &opts.name, "join", || join_dynamic(store, opts, url)),
    }
}

/// Claims `names/<rank>` for this worker (a second claim by the same name is fine: a
/// restarted worker).
fn claim_rank(store: &dyn Store, opts: &AgentOptions) -> Result<(), RendezvousError> {
    let key = format!("names/{}", opts.rank);
    let held = text(store.compare_set(&key, b"", opts.name.as_bytes())?);
    if held != opts.name {
        return Err(RendezvousError::DuplicateRank {
            rank: opts.rank,
            names: (held, opts.name.clone()),
        });
    }
    Ok(())
}

fn join_static(
    store: &dyn Store,
    opts: &AgentOptions,
    world_size: u32,
    url: &str,
) -> Result<Group, RendezvousError> {
    claim_rank(store, opts)?;
    store.set(&format!("addrs/{}", opts.name), url.as_bytes())?;
    let keys: Vec<String> = (0..world_size).map(|r| format!("names/{r}")).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let names: BTreeMap<u32, String> = (0..world_size)
        .zip(store.multi_get(&refs)?.into_iter().map(text))
        .collect();
    check_unique(&names)?;
    let addr_keys: Vec<String> = names.values().map(|n| format!("addrs/{n}")).collect();
    let refs: Vec<&str> = addr_keys.iter().map(String::as_str).collect();
    let addrs = names
        .values()
        .cloned()
        .zip(store.multi_get(&refs)?.into_iter().map(text))
        .collect();
    Ok(Group { names, addrs })
}

fn check_unique(names: &BTreeMap<u32, String>) -> Result<(), RendezvousError> {
    let mut seen: BTreeMap<&str, u32> = BTreeMap::new();
    for (&rank, name) in names {
        if let Some(&other) = seen.get(name.as_str()) {
            return Err(RendezvousError::DuplicateName {
                name: name.clone(),
                ranks: (other, rank),
            });
        }
        seen.insert(name, rank);
    }
    Ok(())
}

/// `name-rank,` entries of `names/_ALL_WORKER_INFOS`.
fn parse_all(v: &str) -> BTreeMap<u32, String> {
    v.split(',')
        .filter_map(|e| {
            let (name, rank) = e.rsplit_once('-')?;
            Some((rank.parse().ok()?, name.to_string()))
        })
        .collect()
}

fn join_dynamic(
    store: &dyn Store,
    opts: &AgentOptions,
    url: &str,
) -> Result<Group, RendezvousError> {
    let entry = format!("{}-{},", opts.name, opts.rank);
    let mut names = loop {
        let current = member_list(store)?;
        let mut names = parse_all(&current);
        if let Some((&rank, _)) = names.iter().find(|(_, n)| **n == opts.name)
            && rank != opts.rank
        {
            return Err(RendezvousError::DuplicateName {
                name: opts.name.clone(),
                ranks: (rank, opts.rank),
            });
        }
        claim_rank(store, opts)?;
        if names.get(&opts.rank) == Some(&opts.name) {
            break names; // already listed (a restarted worker)
        }
        let mut next = current.clone();
        next.push_str(&entry);
        if text(store.compare_set(ALL, current.as_bytes(), next.as_bytes())?) == next {
            names.insert(opts.rank, opts.name.clone());
            break names;
        }
        // Someone else changed the list: read it again.
    };
    store.set(&format!("addrs/{}", opts.name), url.as_bytes())?;
    let mut addrs = BTreeMap::new();
    for name in names.values_mut() {
        addrs.insert(name.clone(), text(store.get(&format!("addrs/{name}"))?));
    }
    Ok(Group { names, addrs })
}

/// Leaves a dynamic group: takes this worker out of the member list and frees its
/// rank and address, under the membership token.
///
/// # Errors
/// The store's error.
pub fn leave(store: &dyn Store, opts: &AgentOptions) -> Result<(), RendezvousError> {
    with_token(store, &opts.name, "leave", || {
        unlist(store, opts)?;
        forget_address(store, opts)
    })
}

/// Takes this worker out of the member list and frees its rank (the caller holds the
/// membership token).
pub(crate) fn unlist(store: &dyn Store, opts: &AgentOptions) -> Result<(), RendezvousError> {
    let entry = format!("{}-{},", opts.name, opts.rank);
    loop {
        let current = text(store.get(ALL)?);
        let next = current.replace(&entry, "");
        if next == current
            || text(store.compare_set(ALL, current.as_bytes(), next.as_bytes())?) == next
        {
            break;
        }
    }
    store.delete_key(&format!("names/{}", opts.rank))?;
    Ok(())
}

/// Deletes this worker's address (the caller holds the membership token).
pub(crate) fn forget_address(
    store: &dyn Store,
    opts: &AgentOptions,
) -> Result<(), RendezvousError> {
    store.delete_key(&format!("addrs/{}", opts.name))?;
    Ok(())
}

/// A dynamic group's members now (rank → name), read without waiting.
///
/// # Errors
/// The store's error.
pub fn members(store: &dyn Store) -> Result<BTreeMap<u32, String>, RendezvousError> {
    Ok(parse_all(&member_list(store)?))
}

/// `names/_ALL_WORKER_INFOS` as it is now (empty before the first member), read
/// without waiting.
fn member_list(store: &dyn Store) -> Result<String, StoreError> {
    Ok(if store.check(&[ALL])? {
        text(store.get(ALL)?)
    } else {
        String::new()
    })
}

/// A worker's published address, waiting for it up to the store's timeout.
pub(crate) fn address(store: &dyn Store, name: &str) -> Result<String, RendezvousError> {
    Ok(text(store.get(&format!("addrs/{name}"))?))
}

/// Runs `f` holding the group's membership token, so joins and leaves happen one at a
/// time; polls (up to the store's timeout) while another worker holds it. A worker
/// that died holding it blocks the next join or leave until that times out, naming
/// the holder.
pub(crate) fn with_token<T, E: From<StoreError>>(
    store: &dyn Store,
    name: &str,
    op: &str,
    f: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    let mine = format!("Token_for_{name}_{op}");
    let start = Instant::now();
    loop {
        let held = text(store.compare_set(TOKEN, b"", mine.as_bytes())?);
        if held == mine {
            break;
        }
        let timeout = store.timeout();
        if !timeout.is_zero() && start.elapsed() >= timeout {
            return Err(StoreError::Timeout {
                op: "membership token",
                keys: vec![format!("{TOKEN} (held by {held})")],
                waited: start.elapsed(),
            }
            .into());
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let out = f();
    // As upstream: the holder's Done key, for anyone debugging; then the token is free.
    store.set(&mine, b"Done")?;
    store.compare_set(TOKEN, mine.as_bytes(), b"")?;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;
    use tp_store::{MemoryStore, PrefixStore};

    fn store() -> Arc<dyn Store> {
        let s: Arc<dyn Store> = Arc::new(MemoryStore::new());
        s.set_timeout(Duration::from_secs(20));
        Arc::new(PrefixStore::new("rpc_prefix_0", s))
    }

    fn opts(name: &str, rank: u32, world: Option<u32>) -> AgentOptions {
        AgentOptions {
            world_size: world,
            ..AgentOptions::new(name, rank)
        }
    }

    #[test]
    fn a_static_group_of_four_finds_everyone() {
        let s = store();
        let threads: Vec<_> = (0..4u32)
            .map(|r| {
                let s = s.clone();
                std::thread::spawn(move || {
                    join(
                        &*s,
                        &opts(&format!("w{r}"), r, Some(4)),
                        &format!("tcp://h:{r}"),
                    )
                    .unwrap()
                })
            })
            .collect();
        for t in threads {
            let g = t.join().unwrap();
            assert_eq!(g.names.len(), 4);
            for r in 0..4u32 {
                assert_eq!(g.names[&r], format!("w{r}"));
                assert_eq!(g.addrs[&format!("w{r}")], format!("tcp://h:{r}"));
            }
        }
    }

    #[test]
    fn a_static_group_rendezvouses_over_a_tcp_store() {
        use tp_store::{TcpStore, TcpStoreOptions};
        let server = TcpStore::new(TcpStoreOptions {
            port: 0,
            is_server: true,
            timeout: Duration::from_secs(20),
            ..TcpStoreOptions::default()
        })
        .unwrap();
        let port = server.port();
        let threads: Vec<_> = (0..4u32)
            .map(|r| {
                std::thread::spawn(move || {
                    let client: Arc<dyn Store> = Arc::new(
                        TcpStore::new(TcpStoreOptions {
                            port,
                            timeout: Duration::from_secs(20),
                            ..TcpStoreOptions::default()
                        })
                        .unwrap(),
                    );
                    let s = PrefixStore::new("rpc_prefix_0", client);
                    join(
                        &s,
                        &opts(&format!("t{r}"), r, Some(4)),
                        &format!("tcp://h:{r}"),
                    )
                    .unwrap()
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap().addrs.len(), 4);
        }
        // PyTorch's key layout, with the TCPStore client's leading '/'.
        assert_eq!(server.get("rpc_prefix_0/names/3").unwrap(), b"t3");
        assert_eq!(
            server.get("rpc_prefix_0/rpcIsStaticGroup").unwrap(),
            b"true"
        );
    }

    #[test]
    fn duplicates_and_mixed_groups_are_refused_naming_both() {
        let s = store();
        s.set("names/1", b"w1").unwrap();
        s.set("addrs/w1", b"x").unwrap();
        // w0 also at rank 1.
        let e = join(&*s, &opts("w0", 1, Some(2)), "u").unwrap_err();
        assert!(
            e.to_string()
                .contains("rank 1 is not unique: \"w1\" has it and \"w0\""),
            "{e}"
        );
        // Same name at two ranks.
        let e = join(&*s, &opts("w1", 0, Some(2)), "u").unwrap_err();
        assert!(
            e.to_string()
                .contains("\"w1\" is not unique: workers of rank 0 and 1"),
            "{e}"
        );
        // A dynamic worker in a static group.
        let e = join(&*s, &opts("w9", 9, None), "u").unwrap_err();
        assert!(matches!(e, RendezvousError::MixedGroup), "{e}");
    }

    #[test]
    fn a_static_worker_alone_times_out_naming_the_missing_rank() {
        let s = store();
        s.set_timeout(Duration::from_millis(200));
        let e = join(&*s, &opts("w0", 0, Some(2)), "u").unwrap_err();
        assert!(e.to_string().contains("names/1"), "{e}");
    }

    #[test]
    fn dynamic_workers_join_and_leave_one_at_a_time() {
        let s = store();
        let threads: Vec<_> = (0..4u32)
            .map(|r| {
                let s = s.clone();
                std::thread::spawn(move || {
                    join(&*s, &opts(&format!("d{r}"), r, None), &format!("u{r}")).unwrap()
                })
            })
            .collect();
        let groups: Vec<Group> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        // Everyone saw itself and those before it; the last one saw all four.
        assert!(groups.iter().any(|g| g.names.len() == 4));
        for (r, g) in groups.iter().enumerate() {
            assert_eq!(g.names[&(r as u32)], format!("d{r}"));
            assert_eq!(g.addrs[&format!("d{r}")], format!("u{r}"));
        }
        let all = text(s.get(ALL).unwrap());
        assert_eq!(parse_all(&all).len(), 4);
        // d2 leaves; a newcomer sees three, and may take rank 2.
        leave(&*s, &opts("d2", 2, None)).unwrap();
        let g = join(&*s, &opts("e2", 2, None), "v").unwrap();
        assert_eq!(g.names.len(), 4);
        assert_eq!(g.names[&2], "e2");
        assert!(!g.addrs.contains_key("d2"));
        // A second worker named d0 is refused.
        let e = join(&*s, &opts("d0", 7, None), "w").unwrap_err();
        assert!(matches!(e, RendezvousError::DuplicateName { .. }), "{e}");
        // The token is free again.
        assert_eq!(s.get(TOKEN).unwrap(), b"");
    }
}
