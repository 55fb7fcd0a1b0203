//! A TCP load-balancing proxy: one front address for a service's healthy instances.
//!
//! Each accepted connection goes to one upstream chosen by the service's
//! [`LoadBalancer`]; bytes flow both ways until each side has closed (a
//! half-close is passed on, so a client that shuts its write side still gets
//! the whole answer). Upstreams come and go with [`Proxy::set_upstreams`]
//! (the engine passes the healthy instances); one that leaves stops getting
//! new connections at once while its open ones finish (draining).
//!
//! Passive outlier detection follows Envoy: every upstream has a
//! [`CircuitBreaker`] fed by connect failures and resets; when it opens, the
//! upstream is ejected for the breaker's open duration (never more than
//! `max_ejection_percent` of the upstreams at once, but always at least one),
//! then gets traffic again, the first connection being the half-open trial.
//! A connect failure moves on to another upstream before the client notices,
//! up to `max_attempts`, as long as the retry budget allows.
//!
//! An HTTP front ([`ProxyConfig::http`], [`Proxy::set_http`]) frames HTTP/1 messages
//! ([`crate::http1`]): a connection to an upstream that was removed ends at a message
//! boundary, its next response carrying `Connection: close` (as Envoy and `HAProxy` drain
//! HTTP/1), and one that stays quiet between messages for [`IDLE_CLOSE`] is closed; a plain
//! TCP front's connections finish only when their peers close them.
//!
//! ```
//! use corral_core::proxy::{Proxy, ProxyConfig};
//! use std::io::{Read, Write};
//!
//! let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
//! let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
//! let upstream = echo.local_addr().unwrap();
//! std::thread::spawn(move || {
//!     let (mut s, _) = echo.accept().unwrap();
//!     let mut buf = [0u8; 5];
//!     s.read_exact(&mut buf).unwrap();
//!     s.write_all(&buf).unwrap();
//! });
//! let proxy = Proxy::bind("127.0.0.1:0".parse().unwrap(), ProxyConfig::default(), rt.handle()).unwrap();
//! proxy.set_upstreams(vec![("echo-0".into(), upstream, 1)]);
//! let front = proxy.local_addr();
//! let t = std::thread::spawn(move || {
//!     let mut c = std::net::TcpStream::connect(front).unwrap();
//!     c.write_all(b"hello").unwrap();
//!     let mut got = [0u8; 5];
//!     c.read_exact(&mut got).unwrap();
//!     got
//! });
//! rt.block_on(async { while !t.is_finished() { tokio::time::sleep(std::time::Duration::from_millis(5)).await } });
//! assert_eq!(&t.join().unwrap(), b"hello");
//! ```

use crate::error::ProxyError;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::task::AbortHandle;

use crate::balance::{ConnectionGuard, LoadBalancer, Strategy};
use crate::breaker::{BreakerConfig, CircuitBreaker, State};
use crate::histogram::{Histogram, HistogramSnapshot, CONNECT_BOUNDS};
use crate::http1::{with_close, Framer, Piece, Role};
use crate::mesh::TlsFront;
use crate::retry::RetryBudget;
use crate::rng::stable_hash;

/// How a proxy behaves.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// How upstreams are chosen.
    pub strategy: Strategy,
    /// Bound on one connect to an upstream.
    pub connect_timeout: Duration,
    /// Upstreams tried for one client connection, the first included.
    pub max_attempts: u32,
    /// Share of upstreams that may be ejected at once (at least one always may).
    pub max_ejection_percent: u32,
    /// The breaker of each upstream (its open duration is the ejection time).
    pub breaker: BreakerConfig,
    /// Retries allowed as a share of first attempts (Finagle's budget): `(ratio, min_per_second)`.
    pub retry_budget: (f64, f64),
    /// How long a connection waits for an upstream while there is none (the only replica
    /// restarting, a new agent re-adopting its instances) before it is closed; zero closes
    /// it at once. as `timeout queue` in `HAProxy`, for an empty backend.
    pub hold: Duration,
    /// Frame HTTP/1 (see the [module docs](self)): a draining upstream's connections end
    /// at a message boundary.
    pub http: bool,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            strategy: Strategy::LeastConnections,
            connect_timeout: Duration::from_secs(1),
            max_attempts: 3,
            max_ejection_percent: 50,
            breaker: BreakerConfig {
                failure_threshold: 3,
                reset_timeout: Duration::from_secs(5),
                max_reset_timeout: Some(Duration::from_secs(60)),
                ..BreakerConfig::default()
            },
            retry_budget: (0.2, 10.0),
            hold: Duration::from_secs(5),
            http: false,
        }
    }
}

/// Counters of one upstream or of a whole proxy.
#[derive(Debug, Default)]
pub struct Counters {
    connections: AtomicU64,
    active: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    errors: AtomicU64,
    ejections: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// Connections relayed (accepted by an upstream).
    pub connections: u64,
    /// Connections open now.
    pub active: u64,
    /// Bytes from clients to upstreams.
    pub bytes_in: u64,
    /// Bytes from upstreams to clients.
    pub bytes_out: u64,
    /// Connect failures and resets.
    pub errors: u64,
    /// Times an upstream was ejected.
    pub ejections: u64,
}

impl Counters {
    /// The values now.
    pub fn snapshot(&self) -> CounterSnapshot {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CounterSnapshot {
            connections: r(&self.connections),
            active: r(&self.active),
            bytes_in: r(&self.bytes_in),
            bytes_out: r(&self.bytes_out),
            errors: r(&self.errors),
            ejections: r(&self.ejections),
        }
    }
}

/// One upstream: an instance behind the proxy.
#[derive(Debug)]
pub struct Upstream {
    /// The instance id.
    pub id: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its outlier detector.
    pub breaker: CircuitBreaker,
    /// Its counters.
    pub counters: Counters,
    /// How long each connect to it took (failed ones too, up to the timeout).
    pub connect: Histogram,
    ejected: AtomicBool,
    /// Set once it is removed: its HTTP connections end at their next message boundary.
    drain: tokio::sync::watch::Sender<bool>,
}

impl Upstream {
    /// Whether it is ejected now.
    pub fn is_ejected(&self) -> bool {
        self.ejected.load(Ordering::Acquire)
    }
}

/// A running proxy; see the [module docs](self).
pub struct Proxy {
    cfg: ProxyConfig,
    lb: LoadBalancer<Arc<Upstream>>,
    budget: RetryBudget,
    totals: Counters,
    refused: AtomicU64,
    ejected_now: Arc<AtomicUsize>,
    local: SocketAddr,
    handle: Handle,
    /// Swapped whole by [`Proxy::set_tls`]; each connection loads it once, at accept.
    tls: ArcSwapOption<TlsFront>,
    tls_refused: AtomicU64,
    accept: Mutex<Option<AbortHandle>>,
    /// Woken when upstreams are added: connections held for one try again.
    added: tokio::sync::Notify,
    /// Connections waiting for an upstream now.
    held: AtomicU64,
    /// [`ProxyConfig::hold`], changed by [`Proxy::set_hold`].
    hold_ms: AtomicU64,
    /// [`ProxyConfig::http`], changed by [`Proxy::set_http`].
    http: AtomicBool,
    /// Upstreams removed while connections to them were open (pruned once they closed).
    draining: Mutex<Vec<Arc<Upstream>>>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("local", &self.local)
            .field("upstreams", &self.lb.len())
            .finish_non_exhaustive()
    }
}

/// Bound on a client's TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// One upstream's state, for stats.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamStats {
    /// The id it was given (an instance id).
    pub id: String,
    /// Where it listens.
    pub address: SocketAddr,
    /// Ejected now (its breaker is open).
    pub ejected: bool,
    /// Its counters.
    pub counters: CounterSnapshot,
    /// Its connect durations, over [`CONNECT_BOUNDS`].
    pub connect: HistogramSnapshot,
}

impl Proxy {
    /// Binds `addr` (port 0 picks one) and starts accepting on `handle`'s runtime.
    pub fn bind(
        addr: SocketAddr,
        cfg: ProxyConfig,
        handle: &Handle,
    ) -> Result<Arc<Proxy>, ProxyError> {
        Self::bind_with(addr, cfg, handle, None)
    }

    /// Like [`Proxy::bind`], as an mTLS front: clients must complete `tls`'s handshake.
    pub fn bind_tls(
        addr: SocketAddr,
        cfg: ProxyConfig,
        handle: &Handle,
        tls: TlsFront,
    ) -> Result<Arc<Proxy>, ProxyError> {
        Self::bind_with(addr, cfg, handle, Some(tls))
    }

    fn bind_with(
        addr: SocketAddr,
        cfg: ProxyConfig,
        handle: &Handle,
        tls: Option<TlsFront>,
    ) -> Result<Arc<Proxy>, ProxyError> {
        if cfg.max_attempts == 0 || cfg.max_ejection_percent > 100 {
            return Err(ProxyError::InvalidConfig(format!(
                "max_attempts must be at least 1 (got {}), max_ejection_percent at most 100 (got {})",
                cfg.max_attempts, cfg.max_ejection_percent
            )));
        }
        let invalid = |e: &dyn std::fmt::Display| ProxyError::InvalidConfig(e.to_string());
        let lb = LoadBalancer::with_keys(cfg.strategy, Vec::new()).map_err(|e| invalid(&e))?;
        let (ratio, min) = cfg.retry_budget;
        let budget =
            RetryBudget::new(ratio, min, Duration::from_secs(10)).map_err(|e| invalid(&e))?;
        CircuitBreaker::new(cfg.breaker.clone()).map_err(|e| invalid(&e))?;
        let bind_err = |source| ProxyError::Bind { addr, source };
        let std_listener = std::net::TcpListener::bind(addr).map_err(bind_err)?;
        std_listener.set_nonblocking(true).map_err(bind_err)?;
        let local = std_listener.local_addr().map_err(bind_err)?;
        let (cfg_hold, cfg_http) = (cfg.hold, cfg.http);
        let proxy = Arc::new(Proxy {
            cfg,
            lb,
            budget,
            totals: Counters::default(),
            refused: AtomicU64::new(0),
            ejected_now: Arc::new(AtomicUsize::new(0)),
            local,
            handle: handle.clone(),
            tls: ArcSwapOption::from(tls.map(Arc::new)),
            tls_refused: AtomicU64::new(0),
            accept: Mutex::new(None),
            added: tokio::sync::Notify::new(),
            held: AtomicU64::new(0),
            hold_ms: AtomicU64::new(duration_ms(cfg_hold)),
            http: AtomicBool::new(cfg_http),
            draining: Mutex::new(Vec::new()),
        });
        let listener = {
            let _guard = handle.enter();
            TcpListener::from_std(std_listener).map_err(bind_err)?
        };
        let p = proxy.clone();
        let task = handle.spawn(async move { p.accept_loop(listener).await });
        *proxy.accept.lock() = Some(task.abort_handle());
        Ok(proxy)
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Makes `(id, address, weight)` the upstreams: new ones are added, missing ones stop
    /// receiving connections at once (their open connections go on), others keep their
    /// counters and breakers.
    pub fn set_upstreams(&self, wanted: Vec<(String, SocketAddr, u32)>) {
        let mut added = false;
        for b in self.lb.backends() {
            if !wanted
                .iter()
                .any(|(id, addr, _)| *id == b.value.id && *addr == b.value.addr)
            {
                if b.value.is_ejected() {
                    self.ejected_now.fetch_sub(1, Ordering::AcqRel);
                    b.value.ejected.store(false, Ordering::Release);
                }
                if b.value.counters.active.load(Ordering::Relaxed) > 0 {
                    self.draining.lock().push(b.value.clone());
                }
                b.value.drain.send_replace(true);
                self.lb.remove_backend(&b);
            }
        }
        for (id, addr, weight) in wanted {
            if self.lb.find(|u| u.id == id && u.addr == addr).is_none() {
                let breaker =
                    CircuitBreaker::new(self.cfg.breaker.clone()).expect("validated in bind");
                let key = stable_hash(id.as_bytes());
                let up = Arc::new(Upstream {
                    id,
                    addr,
                    breaker,
                    counters: Counters::default(),
                    connect: Histogram::new(&CONNECT_BOUNDS),
                    ejected: AtomicBool::new(false),
                    drain: tokio::sync::watch::Sender::new(false),
                });
                let _ = self.lb.add(up, key, weight.max(1));
                added = true;
            }
        }
        if added {
            self.added.notify_waiters();
        }
    }

    /// Connections open now to upstream `id`, whether it is still an upstream or was
    /// removed and is draining: what a stop waits on before its signal.
    pub fn active_to(&self, id: &str) -> u64 {
        let mut draining = self.draining.lock();
        draining.retain(|u| u.counters.active.load(Ordering::Relaxed) > 0);
        let gone: u64 = draining
            .iter()
            .filter(|u| u.id == id)
            .map(|u| u.counters.active.load(Ordering::Relaxed))
            .sum();
        drop(draining);
        let here: u64 = self
            .lb
            .backends()
            .iter()
            .filter(|b| b.value.id == id)
            .map(|b| b.value.counters.active.load(Ordering::Relaxed))
            .sum();
        gone + here
    }

    /// Connections waiting now for an upstream to appear (see [`ProxyConfig::hold`]).
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// How long a connection waits for an upstream while there is none, from the next
    /// such wait on (an apply that changes only `front_hold`).
    pub fn set_hold(&self, hold: Duration) {
        self.hold_ms.store(duration_ms(hold), Ordering::Relaxed);
    }

    /// Frames HTTP/1 on connections accepted from now on, or not (an apply of the
    /// front's protocol).
    pub fn set_http(&self, http: bool) {
        self.http.store(http, Ordering::Relaxed);
    }

    /// Changes how upstreams are chosen, from the next connection on (an apply that changes
    /// only `balance`): the listener, the upstreams and the connections in flight stay.
    pub fn set_strategy(&self, strategy: Strategy) {
        self.lb.set_strategy(strategy);
    }

    /// Makes the front mTLS with `tls`, or plain with `None`, from the next connection on;
    /// connections accepted before keep what they were accepted with.
    pub fn set_tls(&self, tls: Option<TlsFront>) {
        self.tls.store(tls.map(Arc::new));
    }

    /// Stops accepting; open connections finish on their own.
    pub fn close(&self) {
        if let Some(h) = self.accept.lock().take() {
            h.abort();
        }
    }

    /// The proxy's totals and the number of connections refused for want of an upstream.
    pub fn totals(&self) -> (CounterSnapshot, u64) {
        (self.totals.snapshot(), self.refused.load(Ordering::Relaxed))
    }

    /// Connections refused at the TLS handshake (mTLS fronts only).
    pub fn tls_refused(&self) -> u64 {
        self.tls_refused.load(Ordering::Relaxed)
    }

    /// The TLS side, for an mTLS front.
    pub fn tls(&self) -> Option<Arc<TlsFront>> {
        self.tls.load_full()
    }

    /// Each upstream: id, address, ejected, counters.
    pub fn upstreams(&self) -> Vec<UpstreamStats> {
        self.lb
            .backends()
            .iter()
            .map(|b| UpstreamStats {
                id: b.value.id.clone(),
                address: b.value.addr,
                ejected: b.value.is_ejected(),
                counters: b.value.counters.snapshot(),
                connect: b.value.connect.snapshot(),
            })
            .collect()
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((client, peer)) => {
                    let p = self.clone();
                    tokio::spawn(async move { p.serve(client, peer).await });
                }
                // Out of descriptors and the like: back off a little rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    async fn serve(self: Arc<Self>, mut client: TcpStream, peer: SocketAddr) {
        let _ = client.set_nodelay(true);
        let key = (self.lb.strategy() == Strategy::IpHash).then(|| match peer.ip() {
            IpAddr::V4(ip) => stable_hash(&ip.octets()),
            IpAddr::V6(ip) => stable_hash(&ip.octets()),
        });
        if let Some(tls) = self.tls.load_full() {
            // Boxed: the TLS state (the handshake, the session's buffers) is kilobytes, and
            // in the plain path's future it would be allocated and moved with every
            // connection, TLS or not.
            return Box::pin(self.serve_tls(client, key, tls)).await;
        }
        let Some((server, up, guard)) = self.connect_upstream(key).await else {
            self.refused.fetch_add(1, Ordering::Relaxed);
            let _ = client.shutdown().await;
            return;
        };
        let (cr, cw) = client.split();
        if self.http.load(Ordering::Relaxed) {
            return Box::pin(self.relay_http(cr, cw, server, &up, guard)).await;
        }
        self.relay(cr, cw, server, &up, guard).await;
    }

    /// An mTLS front's connection: the handshake (client certificate, SPIFFE ID) comes
    /// first; the upstream behind it speaks plain TCP.
    async fn serve_tls(&self, client: TcpStream, key: Option<u64>, tls: Arc<TlsFront>) {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.clone());
        let Ok(Ok(stream)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(client)).await
        else {
            self.tls_refused.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Some((server, up, guard)) = self.connect_upstream(key).await else {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let (cr, cw) = tokio::io::split(stream);
        if self.http.load(Ordering::Relaxed) {
            return Box::pin(self.relay_http(cr, cw, server, &up, guard)).await;
        }
        self.relay(cr, cw, server, &up, guard).await;
    }

    /// Connects to an upstream, retrying others on failure within the budget; while there
    /// is no upstream at all, waits up to [`ProxyConfig::hold`] for one.
    async fn connect_upstream(
        &self,
        key: Option<u64>,
    ) -> Option<(TcpStream, Arc<Upstream>, ConnectionGuard<Arc<Upstream>>)> {
        let hold = Duration::from_millis(self.hold_ms.load(Ordering::Relaxed));
        if !self.lb.is_empty() || hold.is_zero() {
            return self.try_upstreams(key).await;
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + hold;
        let got = loop {
            // Registered before the look, so an add between the two still wakes it.
            let added = self.added.notified();
            if !self.lb.is_empty() {
                break self.try_upstreams(key).await;
            }
            if tokio::time::timeout_at(deadline, added).await.is_err() {
                break None;
            }
        };
        self.held.fetch_sub(1, Ordering::Relaxed);
        got
    }

    async fn try_upstreams(
        &self,
        key: Option<u64>,
    ) -> Option<(TcpStream, Arc<Upstream>, ConnectionGuard<Arc<Upstream>>)> {
        // Upstreams that failed this client; allocated only when a connect fails.
        let mut tried: Vec<Arc<Upstream>> = Vec::new();
        for attempt in 0..self.cfg.max_attempts.max(1) {
            let guard = if attempt == 0 {
                self.budget.deposit();
                self.lb.connection(key).ok()
            } else if self.budget.try_withdraw() {
                // A retry goes to the least busy upstream not tried yet for this client.
                self.lb
                    .backends()
                    .into_iter()
                    .filter(|b| b.is_up() && !tried.iter().any(|t| Arc::ptr_eq(t, &b.value)))
                    .min_by_key(|b| b.active())
                    .map(|b| self.lb.connection_to(&b))
            } else {
                None
            };
            let guard = guard?;
            let up = guard.backend().value.clone();
            if up.breaker.allow().is_err() {
                self.eject(&up);
                tried.push(up);
                continue;
            }
            let began = std::time::Instant::now();
            let connected =
                tokio::time::timeout(self.cfg.connect_timeout, TcpStream::connect(up.addr)).await;
            up.connect.record(began.elapsed());
            if let Ok(Ok(server)) = connected {
                up.breaker.record_success();
                return Some((server, up, guard));
            }
            self.failed(&up);
            tried.push(up);
        }
        None
    }

    fn failed(&self, up: &Arc<Upstream>) {
        up.breaker.record_failure();
        up.counters.errors.fetch_add(1, Ordering::Relaxed);
        self.totals.errors.fetch_add(1, Ordering::Relaxed);
        if up.breaker.state() == State::Open {
            self.eject(up);
        }
    }

    /// Takes `up` out of rotation for its breaker's open duration, within the ejection cap.
    fn eject(&self, up: &Arc<Upstream>) {
        let cap = (self.lb.len().max(1) * self.cfg.max_ejection_percent as usize / 100).max(1);
        if up.is_ejected() || self.ejected_now.load(Ordering::Acquire) >= cap {
            return;
        }
        let Some(backend) = self.lb.find(|u| Arc::ptr_eq(u, up)) else {
            return;
        };
        if up.ejected.swap(true, Ordering::AcqRel) {
            return;
        }
        self.ejected_now.fetch_add(1, Ordering::AcqRel);
        up.counters.ejections.fetch_add(1, Ordering::Relaxed);
        self.totals.ejections.fetch_add(1, Ordering::Relaxed);
        backend.set_up(false);
        let wait = up.breaker.open_remaining().max(Duration::from_millis(1));
        let (up, count) = (up.clone(), self.ejected_now.clone());
        self.handle.spawn(async move {
            tokio::time::sleep(wait).await;
            // Back in rotation, half-open: the next connection is its trial. (If it left
            // meanwhile, set_upstreams already cleared the flag and the count.)
            if up.ejected.swap(false, Ordering::AcqRel) {
                count.fetch_sub(1, Ordering::AcqRel);
                backend.set_up(true);
            }
        });
    }

    async fn relay<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
        &self,
        mut cr: R,
        mut cw: W,
        mut server: TcpStream,
        up: &Arc<Upstream>,
        guard: ConnectionGuard<Arc<Upstream>>,
    ) {
        let _ = server.set_nodelay(true);
        self.opened(up);
        // Borrowed halves: closing the sockets at the end sends what FINs are still owed,
        // so a direction only needs its own shutdown while the other is still open.
        let (mut sr, mut sw) = server.split();
        let (client_done, server_done) = (AtomicBool::new(false), AtomicBool::new(false));
        let (mut up_buf, mut down_buf) = (PooledBuf::take(), PooledBuf::take());
        let upstream_bytes = pump(&mut cr, &mut sw, &mut up_buf, &client_done, &server_done);
        let downstream_bytes = pump(&mut sr, &mut cw, &mut down_buf, &server_done, &client_done);
        let (inbound, outbound) = tokio::join!(upstream_bytes, downstream_bytes);
        // A reset from the upstream (a read error on its side) counts against it.
        if outbound.1 == Some(Side::Reader) || inbound.1 == Some(Side::Writer) {
            self.failed(up);
        }
        self.finished(up, inbound.0, outbound.0);
        drop(guard);
    }
}

impl Proxy {
    /// A relayed connection begins: counted for its upstream and in the totals.
    fn opened(&self, up: &Upstream) {
        for c in [&up.counters, &self.totals] {
            c.connections.fetch_add(1, Ordering::Relaxed);
            c.active.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A relayed connection ended, having carried `inbound` and `outbound` bytes.
    fn finished(&self, up: &Upstream, inbound: u64, outbound: u64) {
        for c in [&up.counters, &self.totals] {
            c.bytes_in.fetch_add(inbound, Ordering::Relaxed);
            c.bytes_out.fetch_add(outbound, Ordering::Relaxed);
            c.active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// How long an HTTP connection to a draining upstream may stay quiet between messages
/// before the front closes it (its client opens a new one, to another instance).
pub const IDLE_CLOSE: Duration = Duration::from_secs(1);

impl Proxy {
    /// [`Proxy::relay`] for an HTTP front: both directions framed, in one task, so that a
    /// connection to a draining upstream ends at a message boundary (see the module docs).
    async fn relay_http<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
        &self,
        mut cr: R,
        mut cw: W,
        mut server: TcpStream,
        up: &Arc<Upstream>,
        guard: ConnectionGuard<Arc<Upstream>>,
    ) {
        let _ = server.set_nodelay(true);
        self.opened(up);
        let (mut sr, mut sw) = server.split();
        let (mut up_buf, mut down_buf) = (PooledBuf::take(), PooledBuf::take());
        let ubuf = up_buf.0.as_deref_mut().expect("taken until dropped");
        let dbuf = down_buf.0.as_deref_mut().expect("taken until dropped");
        let mut drain = up.drain.subscribe();
        let mut draining = *drain.borrow_and_update();
        let mut drain_began = tokio::time::Instant::now();
        let (mut req, mut resp) = (Framer::new(Role::Request), Framer::new(Role::Response));
        let (mut inbound, mut outbound) = (0u64, 0u64);
        let (mut client_open, mut server_open) = (true, true);
        let mut closing = false;
        let mut pending = 0u64;
        let mut quiet_since = tokio::time::Instant::now();
        let mut upstream_failed = false;
        'relay: while client_open || server_open {
            let idle = draining
                && pending == 0
                && req.is_idle()
                && resp.is_idle()
                && !req.is_raw()
                && !resp.is_raw();
            let idle_at = quiet_since.max(drain_began) + IDLE_CLOSE;
            tokio::select! {
                got = cr.read(ubuf), if client_open => {
                    let n = match got {
                        Ok(0) | Err(_) => {
                            client_open = false;
                            if server_open {
                                let _ = sw.write_all(req.held()).await;
                                let _ = sw.shutdown().await;
                            }
                            continue;
                        }
                        Ok(n) => n,
                    };
                    quiet_since = tokio::time::Instant::now();
                    inbound += n as u64;
                    let mut pos = 0;
                    while let Some(piece) = req.next(&ubuf[..n], &mut pos) {
                        let sent = match piece {
                            Piece::Bytes(r) => sw.write_all(&ubuf[r]).await,
                            Piece::Head => {
                                if !req.is_raw() {
                                    pending += 1;
                                    resp.expect(req.was_head_method());
                                }
                                sw.write_all(req.head()).await
                            }
                            Piece::End => Ok(()),
                        };
                        if sent.is_err() {
                            upstream_failed = true;
                            break 'relay;
                        }
                    }
                }
                got = sr.read(dbuf), if server_open => {
                    let n = match got {
                        Ok(0) | Err(_) => {
                            upstream_failed |= got.is_err();
                            server_open = false;
                            if client_open {
                                let _ = cw.write_all(resp.held()).await;
                                let _ = cw.shutdown().await;
                            }
                            continue;
                        }
                        Ok(n) => n,
                    };
                    quiet_since = tokio::time::Instant::now();
                    outbound += n as u64;
                    let mut pos = 0;
                    while let Some(piece) = resp.next(&dbuf[..n], &mut pos) {
                        let sent = match piece {
                            Piece::Bytes(r) => cw.write_all(&dbuf[r]).await,
                            Piece::Head if draining && !closing && !resp.is_raw() && resp.status() >= 200 => {
                                closing = true;
                                cw.write_all(&with_close(resp.head())).await
                            }
                            Piece::Head => cw.write_all(resp.head()).await,
                            Piece::End => {
                                pending = pending.saturating_sub(1);
                                if closing {
                                    // The response that said close is whole: the connection ends.
                                    let _ = cw.flush().await;
                                    let _ = cw.shutdown().await;
                                    break 'relay;
                                }
                                Ok(())
                            }
                        };
                        if sent.is_err() {
                            break 'relay;
                        }
                    }
                }
                changed = drain.changed(), if !draining => {
                    draining = changed.is_err() || *drain.borrow_and_update();
                    drain_began = tokio::time::Instant::now();
                }
                () = tokio::time::sleep_until(idle_at), if idle => {
                    let _ = cw.shutdown().await;
                    break 'relay;
                }
            }
        }
        if upstream_failed {
            self.failed(up);
        }
        self.finished(up, inbound, outbound);
        drop(guard);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Reader,
    Writer,
}

/// Whole milliseconds (at least one for a non-zero duration), saturating.
fn duration_ms(d: Duration) -> u64 {
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    if ms == 0 && !d.is_zero() {
        1
    } else {
        ms
    }
}

/// Size of one direction's relay buffer.
const RELAY_BUF: usize = 8 * 1024;

/// Relay buffers kept per worker thread once a connection is done with them.
const POOLED_BUFS: usize = 128;

thread_local! {
    static BUFS: std::cell::RefCell<Vec<Box<[u8]>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A relay buffer from the worker thread's pool, back in the pool when dropped. A
/// new-connection-per-request load would otherwise pay, for each request, two heap
/// allocations, or (with the buffers in the task itself, as before) zeroing 16 KiB and
/// moving a 16 KiB future into the spawned task.
struct PooledBuf(Option<Box<[u8]>>);

impl PooledBuf {
    fn take() -> Self {
        let pooled = BUFS.try_with(|b| b.borrow_mut().pop()).ok().flatten();
        PooledBuf(Some(
            pooled.unwrap_or_else(|| vec![0u8; RELAY_BUF].into_boxed_slice()),
        ))
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let Some(buf) = self.0.take() {
            // During thread teardown the pool may be gone: the buffer is just freed.
            let _ = BUFS.try_with(|b| {
                let mut b = b.borrow_mut();
                if b.len() < POOLED_BUFS {
                    b.push(buf);
                }
            });
        }
    }
}

/// Copies until EOF, then half-closes the writer unless the writer's side has finished
/// sending too (then closing the socket says it). Returns bytes copied and which side failed.
async fn pump<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut R,
    w: &mut W,
    buf: &mut PooledBuf,
    reader_done: &AtomicBool,
    writer_done: &AtomicBool,
) -> (u64, Option<Side>) {
    let buf = buf.0.as_deref_mut().expect("taken until dropped");
    let mut total = 0u64;
    let failed = loop {
        let n = match r.read(buf).await {
            Ok(0) => break None,
            Ok(n) => n,
            Err(_) => break Some(Side::Reader),
        };
        if w.write_all(&buf[..n]).await.is_err() {
            reader_done.store(true, Ordering::Relaxed);
            return (total, Some(Side::Writer));
        }
        total += n as u64;
    };
    reader_done.store(true, Ordering::Relaxed);
    if !writer_done.load(Ordering::Relaxed) {
        let _ = w.shutdown().await;
    }
    (total, failed)
}
