//! Health probes with the semantics Kubernetes defines.
//!
//! A [`Check`] is one attempt: an HTTP GET whose status must be 200-399, a
//! TCP connect, or a command that must exit 0, each bounded by a timeout.
//! A [`ProbeSpec`] repeats a check every `period` after `initial_delay` and
//! turns results into a verdict with `success_threshold` consecutive
//! successes or `failure_threshold` consecutive failures. [`Health`] runs the
//! three kinds of an instance together: the startup probe gates readiness and
//! liveness; readiness starts "not ready" and reports every change; liveness
//! reports once, when it fails.
//!
//! ```
//! use corral_core::probe::{Check, run_check};
//! use std::time::Duration;
//!
//! let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
//! let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
//! let port = listener.local_addr().unwrap().port();
//! let ok = rt.block_on(run_check(&Check::Tcp { host: "127.0.0.1".into(), port }, Duration::from_secs(1)));
//! assert!(ok.is_ok());
//! ```

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::Instant;

use crate::histogram::Histogram;

/// One probe attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// `GET path` on `host:port`; a status of 200-399 is a success.
    Http {
        /// Host to connect to (an IP address or a name).
        host: String,
        /// TCP port.
        port: u16,
        /// Request path, starting with `/`.
        path: String,
    },
    /// A TCP connection that opens is a success.
    Tcp {
        /// Host to connect to.
        host: String,
        /// TCP port.
        port: u16,
    },
    /// A command that exits 0 is a success; it runs in its own process group, killed on timeout.
    Exec {
        /// The command line.
        argv: Vec<String>,
        /// Extra environment.
        env: Vec<(String, String)>,
        /// Whom it runs as and where: the service's user, group and directory, never more
        /// privilege than the service has.
        run_as: RunAs,
    },
    /// A line of the instance's log matching a pattern (as process-compose's
    /// `ready_log_line`): each attempt reads what was written since the last; once a line
    /// matched, every attempt succeeds.
    Log(Arc<LogWatch>),
}

/// The identity and directory of an exec probe's command (the default: corral's own).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunAs {
    /// The user id (setuid in the child; supplementary groups dropped when root).
    pub uid: Option<u32>,
    /// The group id (setgid in the child).
    pub gid: Option<u32>,
    /// The working directory.
    pub cwd: Option<PathBuf>,
}

/// What a [`Check::Log`] has read of its log file.
#[derive(Debug)]
pub struct LogWatch {
    path: PathBuf,
    regex: regex::Regex,
    state: parking_lot::Mutex<LogState>,
}

#[derive(Debug, Default)]
struct LogState {
    offset: u64,
    inode: u64,
    partial: Vec<u8>,
    matched: Option<String>,
}

/// Bytes one attempt reads at most: a service that floods its log is caught up with over
/// several attempts, never blocking the runtime for long.
const LOG_READ_MAX: usize = 1 << 20;
/// A line longer than this is matched on its first part.
const LOG_LINE_MAX: usize = 64 << 10;

impl LogWatch {
    /// Watches `path` for a line matching `pattern` (a `regex` crate pattern), reading from
    /// byte `offset`, or from the file's end now when `None` (a file that does not exist yet
    /// is read from its start once it does). `Err` says what is wrong with the pattern.
    pub fn new(
        path: impl Into<PathBuf>,
        pattern: &str,
        offset: Option<u64>,
    ) -> Result<Self, String> {
        let regex = regex::RegexBuilder::new(pattern)
            .size_limit(1 << 20)
            .build()
            .map_err(|e| {
                // A syntax error is drawn over three lines; its last says what is wrong.
                let text = e.to_string();
                text.lines()
                    .last()
                    .unwrap_or("")
                    .trim_start_matches("error: ")
                    .to_string()
            })?;
        let path = path.into();
        let meta = std::fs::metadata(&path).ok();
        let state = LogState {
            offset: offset.unwrap_or_else(|| meta.as_ref().map_or(0, std::fs::Metadata::len)),
            inode: meta.as_ref().map_or(0, std::os::unix::fs::MetadataExt::ino),
            ..LogState::default()
        };
        Ok(LogWatch {
            path,
            regex,
            state: parking_lot::Mutex::new(state),
        })
    }

    /// The pattern.
    pub fn pattern(&self) -> &str {
        self.regex.as_str()
    }

    /// The log file watched.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads what was written since the last call: `Ok` naming the matching line once one
    /// has matched. A file that shrank or was replaced (rotated) is read from its start.
    pub fn poll(&self) -> Result<String, String> {
        use std::io::{Read, Seek};
        use std::os::unix::fs::MetadataExt;
        let mut st = self.state.lock();
        if let Some(m) = &st.matched {
            return Ok(m.clone());
        }
        let waiting = || format!("no log line matching /{}/ yet", self.regex.as_str());
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return Err(waiting());
        };
        let meta = f.metadata().map_err(|e| e.to_string())?;
        if meta.ino() != st.inode || meta.len() < st.offset {
            st.inode = meta.ino();
            st.offset = 0;
            st.partial.clear();
        }
        f.seek(std::io::SeekFrom::Start(st.offset))
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        let n = f
            .take(LOG_READ_MAX as u64)
            .read_to_end(&mut buf)
            .map_err(|e| e.to_string())?;
        st.offset += n as u64;
        let mut chunk = std::mem::take(&mut st.partial);
        chunk.extend_from_slice(&buf);
        let mut start = 0;
        for (i, b) in chunk.iter().enumerate() {
            if *b == b'\n' {
                if let Some(m) = self.matches(&chunk[start..i]) {
                    st.matched = Some(m.clone());
                    return Ok(m);
                }
                start = i + 1;
            }
        }
        let rest = &chunk[start..];
        // A last line without its newline yet may already say it (a prompt, a flush).
        if let Some(m) = self.matches(rest) {
            st.matched = Some(m.clone());
            return Ok(m);
        }
        st.partial = rest[..rest.len().min(LOG_LINE_MAX)].to_vec();
        Err(waiting())
    }

    fn matches(&self, line: &[u8]) -> Option<String> {
        let line = String::from_utf8_lossy(&line[..line.len().min(LOG_LINE_MAX)]);
        let line = line.trim_end_matches('\r');
        self.regex.is_match(line).then(|| {
            let shown: String = line.chars().take(200).collect();
            format!("log line matched: {shown}")
        })
    }
}

impl PartialEq for LogWatch {
    fn eq(&self, other: &Self) -> bool {
        self.path == other.path && self.regex.as_str() == other.regex.as_str()
    }
}

impl Eq for LogWatch {}

/// Which of an instance's probes a result comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    /// Gates the other two until it first succeeds; failing it restarts the instance.
    Startup,
    /// Decides whether the instance receives traffic and unblocks dependents.
    Readiness,
    /// Failing it restarts the instance.
    Liveness,
}

impl ProbeKind {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeKind::Startup => "startup",
            ProbeKind::Readiness => "readiness",
            ProbeKind::Liveness => "liveness",
        }
    }
}

/// A check repeated on a schedule, with Kubernetes' thresholds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    /// What to try.
    pub check: Check,
    /// Wait before the first attempt, from the process start.
    pub initial_delay: Duration,
    /// Time between attempts.
    pub period: Duration,
    /// Bound on one attempt.
    pub timeout: Duration,
    /// Consecutive successes that make a failing probe succeed (1 for startup and liveness).
    pub success_threshold: u32,
    /// Consecutive failures that make a probe fail.
    pub failure_threshold: u32,
}

/// The probes of one instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    /// Runs first; readiness and liveness wait for its success.
    pub startup: Option<ProbeSpec>,
    /// Reported on every change, starting from "not ready".
    pub readiness: Option<ProbeSpec>,
    /// Reported once, when it fails.
    pub liveness: Option<ProbeSpec>,
}

/// A verdict of one probe of one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    /// The probe.
    pub kind: ProbeKind,
    /// Success or failure after the thresholds.
    pub ok: bool,
    /// What the last attempt saw ("HTTP 503", "connection refused", "exit status 1").
    pub message: String,
}

/// Runs one attempt of `check`, bounded by `timeout`; `Err` says why it failed.
pub async fn run_check(check: &Check, timeout: Duration) -> Result<String, String> {
    match tokio::time::timeout(timeout, attempt(check)).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {}ms", timeout.as_millis())),
    }
}

async fn attempt(check: &Check) -> Result<String, String> {
    match check {
        Check::Tcp { host, port } => {
            match host.parse::<std::net::IpAddr>() {
                Ok(ip) => tcp_connect(std::net::SocketAddr::new(ip, *port)).await?,
                Err(_) => drop(
                    TcpStream::connect((host.as_str(), *port))
                        .await
                        .map_err(|e| e.to_string())?,
                ),
            }
            // An orderly close, not a reset: the server may not have accepted the connection
            // yet, and many log a reset on an accepted connection as an error (Python's
            // socketserver prints a traceback for each). The TIME_WAIT stays on our side, on
            // an ephemeral port, not on the service's.
            Ok(format!("connected to {host}:{port}"))
        }
        Check::Http { host, port, path } => http_get(host, *port, path).await,
        Check::Exec { argv, env, run_as } => exec(argv, env, run_as).await,
        Check::Log(watch) => watch.poll(),
    }
}

/// Opens (and closes) a TCP connection to `addr`. On loopback the handshake is done by the
/// time a non-blocking `connect` returns, so a zero-timeout `poll` usually settles it: the
/// socket is then never registered with the runtime (two `epoll_ctl` calls and a wake-up
/// saved per probe, about a third of an idle agent's CPU with 1000 instances probed every
/// second). Otherwise it waits on the runtime as any connection does.
async fn tcp_connect(addr: std::net::SocketAddr) -> Result<(), String> {
    use std::os::fd::AsFd;
    let err = |e: std::io::Error| e.to_string();
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let sock = socket2::Socket::from(crate::sys::tcp_socket_nonblocking(domain).map_err(err)?);
    match sock.connect(&addr.into()) {
        Ok(()) => return Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(err(e)),
    }
    let outcome = if crate::sys::writable_now(sock.as_fd()) {
        sock.take_error()
    } else {
        let s = TcpStream::from_std(std::net::TcpStream::from(sock)).map_err(err)?;
        s.writable().await.map_err(err)?;
        s.take_error()
    };
    match outcome.map_err(err)? {
        Some(e) => Err(err(e)),
        None => Ok(()),
    }
}

async fn http_get(host: &str, port: u16, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect((host, port))
        .await
        .map_err(|e| e.to_string())?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: corral-probe\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    // Only the status line matters; read until it is complete.
    let mut buf = [0u8; 256];
    let mut len = 0;
    while !buf[..len].contains(&b'\n') && len < buf.len() {
        let n = s.read(&mut buf[len..]).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        len += n;
    }
    abort(s);
    let line = String::from_utf8_lossy(&buf[..len]);
    let line = line.lines().next().unwrap_or("");
    let status: u16 = line
        .strip_prefix("HTTP/")
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {line:?}"))?;
    if (200..400).contains(&status) {
        Ok(format!("HTTP {status}"))
    } else {
        Err(format!("HTTP {status}"))
    }
}

/// Closes a probe connection with a reset (`SO_LINGER` 0), as `HAProxy` does for its checks:
/// no FIN exchange and no `TIME_WAIT` socket left per probe. With 200 instances probed every
/// second, an orderly close would keep ~12 000 sockets in `TIME_WAIT` (eating ephemeral
/// ports) and cost the agent the kernel's extra packets.
fn abort(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn exec(argv: &[String], env: &[(String, String)], run_as: &RunAs) -> Result<String, String> {
    let Some((program, rest)) = argv.split_first() else {
        return Err("empty command".into());
    };
    let mut cmd = tokio::process::Command::new(program);
    if let Some(gid) = run_as.gid {
        cmd.gid(gid);
    }
    if let Some(uid) = run_as.uid {
        cmd.uid(uid);
    }
    if let Some(cwd) = &run_as.cwd {
        cmd.current_dir(cwd);
    }
    cmd.args(rest)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    // Whatever the command left in its process group (a `sleep &`, say) goes with it, and if
    // the timeout cancels this future the guard kills the command itself too: a probe run
    // leaves nothing behind either way.
    let _guard = KillGroupOnDrop(child.id());
    let status = child.wait().await.map_err(|e| e.to_string())?;
    if status.success() {
        Ok("exit status 0".into())
    } else {
        Err(status.to_string())
    }
}

struct KillGroupOnDrop(Option<u32>);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        if let Some(pgid) = self.0.filter(|&p| p > 1) {
            let _ = crate::sys::killpg(pgid, libc::SIGKILL);
        }
    }
}

/// Upper bounds of the probe-duration histogram, seconds (Prometheus' `le`; `+Inf` beyond).
pub const DURATION_BOUNDS: [f64; 14] = crate::histogram::PROBE_BOUNDS;

/// Every attempt of one probe: a histogram of durations and the failures, counted with
/// atomics on the probe's own task (nothing is locked, nothing is sent per attempt).
#[derive(Debug)]
pub struct ProbeStats {
    durations: Histogram,
    failures: AtomicU64,
}

impl Default for ProbeStats {
    fn default() -> Self {
        ProbeStats {
            durations: Histogram::new(&DURATION_BOUNDS),
            failures: AtomicU64::new(0),
        }
    }
}

impl ProbeStats {
    fn record(&self, took: Duration, ok: bool) {
        self.durations.record(took);
        if !ok {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Cumulative counts per bound of [`DURATION_BOUNDS`], the sum of durations (seconds),
    /// the number of attempts, and how many failed.
    pub fn snapshot(&self) -> (Vec<u64>, f64, u64, u64) {
        let s = self.durations.snapshot();
        (
            s.cumulative,
            s.sum,
            s.count,
            self.failures.load(Ordering::Relaxed),
        )
    }
}

/// The [`ProbeStats`] of an instance's three probes.
#[derive(Debug, Default)]
pub struct HealthStats {
    /// Startup attempts.
    pub startup: ProbeStats,
    /// Readiness attempts.
    pub readiness: ProbeStats,
    /// Liveness attempts.
    pub liveness: ProbeStats,
}

/// Runs the probes of one instance until they end (liveness failed, startup failed) or the
/// task is aborted, sending each verdict tagged with `id` on `tx`.
///
/// `started` is when the process started; initial delays count from it.
pub async fn run_health<I: Clone + Send + 'static>(
    health: Health,
    started: Instant,
    id: I,
    tx: UnboundedSender<(I, ProbeResult)>,
) {
    run_health_counted(health, started, id, tx, Arc::default()).await;
}

/// Like [`run_health`], counting every attempt in `stats`.
pub async fn run_health_counted<I: Clone + Send + 'static>(
    health: Health,
    started: Instant,
    id: I,
    tx: UnboundedSender<(I, ProbeResult)>,
    stats: Arc<HealthStats>,
) {
    let send = |r: ProbeResult| tx.send((id.clone(), r)).is_ok();
    if let Some(spec) = &health.startup {
        let (ok, message) = until_verdict(spec, started, false, &stats.startup).await;
        if !send(ProbeResult {
            kind: ProbeKind::Startup,
            ok,
            message,
        }) || !ok
        {
            return;
        }
    }
    // Readiness and liveness start once startup succeeded (or at once without one).
    let now = Instant::now();
    let base = if health.startup.is_some() {
        now
    } else {
        started
    };
    let readiness = async {
        if let Some(spec) = &health.readiness {
            readiness_loop(spec, base, &send, &stats.readiness).await;
        }
    };
    let liveness = async {
        if let Some(spec) = &health.liveness {
            let (_, message) = until_verdict(spec, base, true, &stats.liveness).await;
            send(ProbeResult {
                kind: ProbeKind::Liveness,
                ok: false,
                message,
            });
        }
    };
    tokio::join!(readiness, liveness);
}

/// Attempt times of a probe: the first at `base + initial_delay` exactly, then every
/// `period` on a phase rounded to the nearest step of a grid of `period / 10` (at most
/// [`MAX_PHASE_GRID`]) from a process-wide epoch. Probes with the same period then share at
/// most ten phases and wake the runtime together: a lone probe costs ~125 µs of CPU here
/// (mostly the wake-up), one in a batch of ten ~35 µs. The price: the gap between the first
/// and second attempt is off by up to half a grid step (5% of the period).
struct Ticker {
    next: Instant,
    period: Duration,
    first: bool,
}

/// The largest rounding step of probe phases.
const MAX_PHASE_GRID: Duration = Duration::from_millis(100);

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Ticker {
    fn new(spec: &ProbeSpec, base: Instant) -> Self {
        Ticker {
            next: base + spec.initial_delay,
            period: spec.period.max(Duration::from_millis(1)),
            first: true,
        }
    }

    async fn tick(&mut self) {
        tokio::time::sleep_until(self.next).await;
        let now = Instant::now();
        if self.first {
            self.first = false;
            let e = epoch();
            let since = (self.next + self.period)
                .saturating_duration_since(e)
                .as_nanos();
            let grid = (self.period / 10)
                .clamp(Duration::from_millis(1), MAX_PHASE_GRID)
                .as_nanos();
            self.next = e + Duration::from_nanos(((since + grid / 2) / grid * grid) as u64);
        } else {
            self.next += self.period;
        }
        // An attempt that overran its period skips the missed ticks rather than bunching up.
        while self.next <= now {
            self.next += self.period;
        }
    }
}

/// Startup: returns at the first success (`stop_on_success`) or after `failure_threshold`
/// consecutive failures. Liveness (`!stop_on_success`): returns only on failure.
async fn until_verdict(
    spec: &ProbeSpec,
    base: Instant,
    liveness: bool,
    stats: &ProbeStats,
) -> (bool, String) {
    let mut t = Ticker::new(spec, base);
    let mut failures = 0;
    loop {
        t.tick().await;
        match timed(spec, stats).await {
            Ok(m) => {
                failures = 0;
                if !liveness {
                    return (true, m);
                }
            }
            Err(m) => {
                failures += 1;
                if failures >= spec.failure_threshold.max(1) {
                    return (false, m);
                }
            }
        }
    }
}

/// One attempt, counted.
async fn timed(spec: &ProbeSpec, stats: &ProbeStats) -> Result<String, String> {
    let t0 = std::time::Instant::now();
    let r = run_check(&spec.check, spec.timeout).await;
    stats.record(t0.elapsed(), r.is_ok());
    r
}

async fn readiness_loop(
    spec: &ProbeSpec,
    base: Instant,
    send: &impl Fn(ProbeResult) -> bool,
    stats: &ProbeStats,
) {
    let mut t = Ticker::new(spec, base);
    let (mut ready, mut successes, mut failures) = (false, 0u32, 0u32);
    // Not ready from the start is said once too, after `failure_threshold` failures, so
    // whoever waits on the instance learns why (the probe's message) before it gives up.
    let mut said_not_ready = false;
    loop {
        t.tick().await;
        let r = timed(spec, stats).await;
        let (ok, message) = match r {
            Ok(m) => (true, m),
            Err(m) => (false, m),
        };
        if ok {
            successes += 1;
            failures = 0;
        } else {
            failures += 1;
            successes = 0;
        }
        let flip = if ready {
            failures >= spec.failure_threshold.max(1)
        } else {
            successes >= spec.success_threshold.max(1)
        };
        let first_failure = !ready && !said_not_ready && failures >= spec.failure_threshold.max(1);
        if flip || first_failure {
            if flip {
                ready = !ready;
            }
            said_not_ready = true;
            if !send(ProbeResult {
                kind: ProbeKind::Readiness,
                ok: ready,
                message,
            }) {
                return;
            }
        }
    }
}
