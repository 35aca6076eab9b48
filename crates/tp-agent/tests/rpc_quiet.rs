//! Shutdown says nothing alarming about the closes it causes itself (PyTorch's users
//! were confused by "EOF: end of file" warnings at every shutdown). A subscriber for
//! the whole process records every warning and error; this binary has one test so
//! nothing else logs into it.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::executor::block_on;
use futures::future::join_all;
use tp_agent::rpc::{Agent, AgentOptions, Reply, Request, RpcMessage, RpcTensor};
use tp_store::{MemoryStore, Store};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// Keeps the text of every WARN and ERROR event.
struct Alarms(Arc<Mutex<Vec<String>>>);

struct Text(String);

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={value:?}", field.name());
    }
}

impl Subscriber for Alarms {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        *m.level() <= Level::WARN
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, e: &Event<'_>) {
        let mut t = Text(format!(
            "{} {}:",
            e.metadata().level(),
            e.metadata().target()
        ));
        e.record(&mut t);
        self.0.lock().unwrap().push(t.0);
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

fn echo(req: Request) -> Reply {
    Reply::from(req.message)
}

fn group(store: &Arc<dyn Store>, n: u32) -> Vec<Agent> {
    let threads: Vec<_> = (0..n)
        .map(|r| {
            let s = store.clone();
            std::thread::spawn(move || {
                let o = AgentOptions {
                    world_size: Some(n),
                    num_worker_threads: 2,
                    ..AgentOptions::new(format!("q{r}"), r)
                };
                Agent::start(o, s, echo).unwrap()
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

fn calls(g: &[Agent]) {
    for a in g {
        let sent: Vec<_> = (0..g.len())
            .map(|to| {
                let m = RpcMessage::new("x").with_tensor(RpcTensor::cpu(vec![to as u8; 70_000]));
                a.send(&format!("q{to}"), m, None)
            })
            .collect();
        for r in block_on(join_all(sent)) {
            r.unwrap();
        }
    }
}

#[test]
fn graceful_and_immediate_shutdowns_log_no_warnings() {
    let alarms = Arc::new(Mutex::new(Vec::new()));
    tracing::subscriber::set_global_default(Alarms(alarms.clone())).unwrap();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    store.set_timeout(Duration::from_secs(30));
    let g = group(&store, 3);
    calls(&g);
    std::thread::scope(|s| {
        for a in &g {
            s.spawn(move || a.shutdown().unwrap());
        }
    });
    drop(g);
    // A second group on a fresh store, closed at once with its pipes open.
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    store.set_timeout(Duration::from_secs(30));
    let g = group(&store, 3);
    calls(&g);
    for a in &g {
        a.shutdown_now();
    }
    drop(g);
    std::thread::sleep(Duration::from_millis(200));
    let seen = alarms.lock().unwrap().clone();
    assert!(seen.is_empty(), "shutdown logged: {seen:#?}");
    // The subscriber does hear warnings: a peer's malformed message is one.
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let g = group(&store, 1);
    let rogue = Arc::new(tp_agent::Context::new("rogue"));
    let pipe = rogue.connect(g[0].url()).unwrap();
    let _ = block_on(pipe.write(tp_agent::Message {
        metadata: b"not rpc".to_vec(),
        ..tp_agent::Message::default()
    }));
    assert!(block_on(pipe.read_descriptor()).is_err());
    let seen = alarms.lock().unwrap().clone();
    assert!(
        seen.iter().any(|l| l.contains("malformed RPC message")),
        "{seen:#?}"
    );
}
