//! A fault-injecting TCP proxy for the Kafka protocol: it forwards frames both ways and can
//! - cut a connection right after the broker answered a Produce request, before the client
//!   sees the answer: the "lost reply" of the Kafka notes (the batch is stored, the producer
//!   does not know, and it retries);
//! - cut a connection in the middle of a Produce request (half the frame forwarded): the broker
//!   never sees a complete request;
//! - delay Produce replies, so requests pile up in flight;
//! - delay every reply of one API (say Metadata), so a client's call is still waiting when
//!   the application cancels it;
//! - cut the connection on every request of one API (say OffsetCommit), so it never lands.
//!
//! The upstream address can be changed while running, so a broker restarted on a new port
//! (after `kill -9`) stays reachable at the proxy's fixed address. Brokers behind it must
//! advertise the proxy's address, or clients would bypass it after their first Metadata.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const PRODUCE: i16 = 0;

/// What the proxy does to Produce replies.
#[derive(Debug, Clone, Copy, Default)]
pub struct FaultPlan {
    /// Cut the connection instead of delivering every n-th Produce reply (0: never).
    pub cut_every_nth_produce_reply: u64,
    /// Cut the connection halfway through forwarding every n-th Produce request (0: never).
    pub cut_every_nth_produce_request: u64,
    /// Hold every n-th Produce reply back for `delay` first (0: never).
    pub delay_every_nth_produce_reply: u64,
    /// How long a delayed reply is held.
    pub delay: std::time::Duration,
    /// Hold every reply of this API key back for `delay` (any API, not only Produce).
    pub delay_replies_of_api: Option<i16>,
    /// Cut the connection instead of forwarding any request of this API key: the broker
    /// never sees it, the client sees its connection break.
    pub cut_requests_of_api: Option<i16>,
}

/// Called with every request frame (size prefix included) before it is forwarded.
pub type RequestHook = Arc<dyn Fn(i16, &[u8]) + Send + Sync>;

#[derive(Default)]
struct Hook(Option<RequestHook>);

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Hook(set)"
        } else {
            "Hook(none)"
        })
    }
}

#[derive(Debug, Default)]
struct Shared {
    upstream: Mutex<Option<SocketAddr>>,
    hook: Mutex<Hook>,
    plan: Mutex<FaultPlan>,
    produce_replies: AtomicU64,
    produce_requests: AtomicU64,
    cut: AtomicU64,
    cut_requests: AtomicU64,
}

/// A running proxy; stops when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1, port 0. Connections are refused until an upstream is set.
    pub async fn start(plan: FaultPlan) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        *shared.plan.lock().expect("plan") = plan;
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(Self { addr, shared, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where new connections go (existing ones keep their broker until they break).
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self.shared.upstream.lock().expect("upstream") = Some(upstream);
    }

    /// Calls `hook` with every request's API key and frame, before forwarding it (what the
    /// broker is about to see, at the moment it leaves the client).
    pub fn on_request(&self, hook: RequestHook) {
        self.shared.hook.lock().expect("hook").0 = Some(hook);
    }

    pub fn set_plan(&self, plan: FaultPlan) {
        *self.shared.plan.lock().expect("plan") = plan;
    }

    /// Produce replies the proxy withheld by cutting the connection.
    pub fn replies_cut(&self) -> u64 {
        self.shared.cut.load(Ordering::Relaxed)
    }

    /// Produce requests the proxy cut in half.
    pub fn requests_cut(&self) -> u64 {
        self.shared.cut_requests.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while let Ok((client, _)) = listener.accept().await {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let Some(upstream) = *shared.upstream.lock().expect("upstream") else {
                return;
            };
            let Ok(broker) = TcpStream::connect(upstream).await else {
                return; // dropping `client` closes it, like a refused connection
            };
            let _ = client.set_nodelay(true);
            let _ = broker.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (broker_read, broker_write) = broker.into_split();
            let api_keys: Arc<Mutex<HashMap<i32, i16>>> = Arc::default();
            let requests = tokio::spawn(forward_requests(
                client_read,
                broker_write,
                Arc::clone(&api_keys),
                Arc::clone(&shared),
            ));
            forward_responses(broker_read, client_write, api_keys, &shared).await;
            requests.abort();
        });
    }
}

async fn read_frame(from: &mut OwnedReadHalf) -> Option<Vec<u8>> {
    let mut prefix = [0u8; 4];
    from.read_exact(&mut prefix).await.ok()?;
    let length = usize::try_from(i32::from_be_bytes(prefix)).ok()?;
    let mut frame = vec![0u8; 4 + length];
    frame[..4].copy_from_slice(&prefix);
    from.read_exact(&mut frame[4..]).await.ok()?;
    Some(frame)
}

async fn forward_requests(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    api_keys: Arc<Mutex<HashMap<i32, i16>>>,
    shared: Arc<Shared>,
) {
    while let Some(frame) = read_frame(&mut from).await {
        if frame.len() >= 12 {
            let api_key = i16::from_be_bytes([frame[4], frame[5]]);
            let correlation_id = i32::from_be_bytes([frame[8], frame[9], frame[10], frame[11]]);
            api_keys
                .lock()
                .expect("api keys")
                .insert(correlation_id, api_key);
            let hook = shared.hook.lock().expect("hook").0.clone();
            if let Some(hook) = hook {
                hook(api_key, &frame);
            }
            if Some(api_key) == shared.plan.lock().expect("plan").cut_requests_of_api {
                shared.cut_requests.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if api_key == PRODUCE {
                let seen = shared.produce_requests.fetch_add(1, Ordering::Relaxed) + 1;
                let every = shared
                    .plan
                    .lock()
                    .expect("plan")
                    .cut_every_nth_produce_request;
                if every > 0 && seen.is_multiple_of(every) {
                    shared.cut_requests.fetch_add(1, Ordering::Relaxed);
                    // Half a frame, then the connection goes: the broker sees a truncated
                    // request and drops the connection; the client sees it break.
                    let _ = to.write_all(&frame[..frame.len() / 2]).await;
                    return;
                }
            }
        }
        if to.write_all(&frame).await.is_err() {
            return;
        }
    }
    let _ = to.shutdown().await;
}

async fn forward_responses(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    api_keys: Arc<Mutex<HashMap<i32, i16>>>,
    shared: &Shared,
) {
    while let Some(frame) = read_frame(&mut from).await {
        if frame.len() >= 8 {
            let correlation_id = i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
            let api_key = api_keys.lock().expect("api keys").remove(&correlation_id);
            let plan = *shared.plan.lock().expect("plan");
            if api_key.is_some() && api_key == plan.delay_replies_of_api {
                tokio::time::sleep(plan.delay).await;
            }
            if api_key == Some(PRODUCE) {
                let seen = shared.produce_replies.fetch_add(1, Ordering::Relaxed) + 1;
                if plan.delay_every_nth_produce_reply > 0
                    && seen.is_multiple_of(plan.delay_every_nth_produce_reply)
                {
                    tokio::time::sleep(plan.delay).await;
                }
                let every = plan.cut_every_nth_produce_reply;
                if every > 0 && seen.is_multiple_of(every) {
                    shared.cut.fetch_add(1, Ordering::Relaxed);
                    // Dropping both halves closes the client side without the reply; the
                    // request task is aborted by the caller, closing the broker side too.
                    return;
                }
            }
        }
        if to.write_all(&frame).await.is_err() {
            return;
        }
    }
}
