//! The proxy over real sockets on 127.0.0.1: distribution, half-close, retries and
//! ejection, draining, `ip_hash` stickiness.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

mod common;

use corral_core::balance::Strategy;
use corral_core::proxy::{Proxy, ProxyConfig};

/// A backend that answers every connection with its name, after reading the request to EOF.
fn named_backend(name: &'static str) -> SocketAddr {
    common::serve(move |mut s| {
        let mut req = Vec::new();
        let _ = s.read_to_end(&mut req);
        let _ = s.write_all(format!("{name}:{}", req.len()).as_bytes());
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

fn proxy(rt: &tokio::runtime::Runtime, strategy: Strategy) -> Arc<Proxy> {
    let cfg = ProxyConfig {
        strategy,
        ..ProxyConfig::default()
    };
    Proxy::bind("127.0.0.1:0".parse().unwrap(), cfg, rt.handle()).unwrap()
}

/// Sends `body`, half-closes, returns the whole answer.
fn ask(front: SocketAddr, body: &[u8]) -> String {
    let mut s = TcpStream::connect(front).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(body).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// A client socket bound to a chosen loopback address (127.0.0.0/8 is all local on Linux).
fn socket2_bind(ip: &str) -> TcpStreamConnector {
    TcpStreamConnector {
        ip: ip.parse().unwrap(),
    }
}

struct TcpStreamConnector {
    ip: std::net::Ipv4Addr,
}

impl TcpStreamConnector {
    fn connect_from(&self, to: SocketAddr) -> std::io::Result<TcpStream> {
        // std has no bind-before-connect; socket2 has.
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        sock.bind(&SocketAddr::new(self.ip.into(), 0).into())?;
        sock.connect(&to.into())?;
        Ok(sock.into())
    }
}

fn tally(answers: &[String]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for a in answers {
        *m.entry(a.split(':').next().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    m
}

#[test]
fn round_robin_spreads_evenly_and_half_close_delivers_the_whole_answer() {
    let rt = runtime();
    let p = proxy(&rt, Strategy::RoundRobin);
    p.set_upstreams(vec![
        ("a".into(), named_backend("a"), 1),
        ("b".into(), named_backend("b"), 1),
        ("c".into(), named_backend("c"), 1),
    ]);
    let front = p.local_addr();
    let answers: Vec<String> = (0..30).map(|_| ask(front, b"0123456789")).collect();
    // The backend read the request to EOF (our half-close reached it) and answered after.
    assert!(answers.iter().all(|a| a.ends_with(":10")), "{answers:?}");
    let t = tally(&answers);
    assert_eq!(
        t.values().copied().collect::<Vec<_>>(),
        vec![10, 10, 10],
        "{t:?}"
    );
    let (totals, refused) = p.totals();
    assert_eq!((totals.connections, refused, totals.bytes_in), (30, 0, 300));
    assert_eq!(
        totals.bytes_out,
        answers.iter().map(|a| a.len() as u64).sum::<u64>()
    );
    // Every connect in its upstream's histogram: ten each, the last bucket (one second, the
    // connect timeout) holding them all, their sum well under that.
    for u in p.upstreams() {
        assert_eq!(u.connect.count, 10, "{u:?}");
        assert_eq!(*u.connect.cumulative.last().unwrap(), 10);
        assert!(u.connect.sum > 0.0 && u.connect.sum < 1.0, "{u:?}");
    }
}

#[test]
fn a_dead_upstream_is_retried_past_then_ejected() {
    let rt = runtime();
    let p = proxy(&rt, Strategy::RoundRobin);
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    p.set_upstreams(vec![
        ("dead".into(), dead, 1),
        ("live".into(), named_backend("live"), 1),
    ]);
    let front = p.local_addr();
    for _ in 0..20 {
        assert!(ask(front, b"x").starts_with("live:"));
    }
    let ups = p.upstreams();
    let d = ups.iter().find(|u| u.id == "dead").unwrap();
    assert!(d.ejected, "ejected after its breaker opened");
    assert_eq!(d.counters.ejections, 1);
    assert_eq!(
        d.counters.errors, 3,
        "three connect failures open the default breaker; then no more tries"
    );
    assert_eq!(d.connect.count, 3, "the failed connects are timed too");
    assert_eq!(p.totals().1, 0, "no client saw a failure");
}

#[test]
fn removed_upstreams_drain_open_connections_and_get_no_new_ones() {
    let rt = runtime();
    let p = proxy(&rt, Strategy::LeastConnections);
    let a = named_backend("a");
    let b = named_backend("b");
    p.set_upstreams(vec![("a".into(), a, 1)]);
    let front = p.local_addr();
    // Open a connection through a, keep it open.
    let mut open = TcpStream::connect(front).unwrap();
    open.write_all(b"slow").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    p.set_upstreams(vec![("b".into(), b, 1)]);
    for _ in 0..5 {
        assert!(ask(front, b"y").starts_with("b:"));
    }
    // The drained connection still completes through a.
    open.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = String::new();
    open.read_to_string(&mut out).unwrap();
    assert_eq!(out, "a:4");
}

fn holding(rt: &tokio::runtime::Runtime, hold: Duration) -> Arc<Proxy> {
    let cfg = ProxyConfig {
        strategy: Strategy::RoundRobin,
        hold,
        ..ProxyConfig::default()
    };
    Proxy::bind("127.0.0.1:0".parse().unwrap(), cfg, rt.handle()).unwrap()
}

#[test]
fn no_upstream_holds_the_connection_then_refuses_and_counts() {
    let rt = runtime();
    let p = holding(&rt, Duration::from_millis(300));
    let mut s = TcpStream::connect(p.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let began = std::time::Instant::now();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(out.is_empty());
    assert!(
        began.elapsed() >= Duration::from_millis(250),
        "held for the hold"
    );
    assert_eq!((p.totals().1, p.held()), (1, 0));
    // Without a hold, closed at once.
    let p = holding(&rt, Duration::ZERO);
    let mut s = TcpStream::connect(p.local_addr()).unwrap();
    let _ = s.read_to_end(&mut out);
    assert_eq!(p.totals().1, 1);
}

#[test]
fn set_hold_changes_the_wait_from_the_next_connection_on() {
    // An apply of front_hold: a front that refused at once now holds, and back.
    let rt = runtime();
    let p = holding(&rt, Duration::ZERO);
    p.set_hold(Duration::from_secs(30));
    let front = p.local_addr();
    let client = std::thread::spawn(move || ask(front, b"hi"));
    while p.held() == 0 {
        std::thread::sleep(Duration::from_millis(5));
    }
    p.set_upstreams(vec![("b".into(), named_backend("b"), 1)]);
    assert_eq!(client.join().unwrap(), "b:2");
    p.set_upstreams(Vec::new());
    p.set_hold(Duration::ZERO);
    let mut s = TcpStream::connect(p.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(out.is_empty());
    assert_eq!((p.totals().1, p.held()), (1, 0), "closed at once, counted");
}

#[test]
fn a_held_connection_goes_to_the_first_upstream_that_appears() {
    // The only replica restarting: the client waits instead of being refused.
    let rt = runtime();
    let p = holding(&rt, Duration::from_secs(30));
    let front = p.local_addr();
    let client = std::thread::spawn(move || ask(front, b"hi"));
    while p.held() == 0 {
        std::thread::sleep(Duration::from_millis(5));
    }
    p.set_upstreams(vec![("b".into(), named_backend("b"), 1)]);
    assert_eq!(client.join().unwrap(), "b:2");
    assert_eq!((p.totals().1, p.held()), (0, 0));
}

#[test]
fn ip_hash_keeps_clients_and_moves_only_those_of_a_removed_upstream() {
    let rt = runtime();
    let p = proxy(&rt, Strategy::IpHash);
    let names = ["a", "b", "c", "d"];
    let ups: Vec<(String, SocketAddr, u32)> = names
        .iter()
        .map(|n| ((*n).to_owned(), named_backend(n), 1))
        .collect();
    p.set_upstreams(ups.clone());
    let front = p.local_addr();
    let clients: Vec<String> = (1..=80)
        .map(|i| format!("127.0.{}.{}", i / 200 + 1, i % 200 + 1))
        .collect();
    let first: Vec<String> = clients.iter().map(|ip| backend_of(front, ip)).collect();
    let again: Vec<String> = clients.iter().map(|ip| backend_of(front, ip)).collect();
    assert_eq!(first, again, "every client stays on its upstream");
    let t = tally(&first);
    assert_eq!(t.len(), 4, "all upstreams get clients: {t:?}");
    p.set_upstreams(ups.into_iter().filter(|u| u.0 != "b").collect());
    let after: Vec<String> = clients.iter().map(|ip| backend_of(front, ip)).collect();
    let moved = first.iter().zip(&after).filter(|(x, y)| x != y).count();
    assert_eq!(
        moved, t["b"],
        "exactly b's clients move (about 1/N of them)"
    );
    assert!(first.iter().zip(&after).all(|(x, y)| x == "b" || x == y));
}

fn backend_of(front: SocketAddr, ip: &str) -> String {
    let c = socket2_bind(ip);
    let mut s = c.connect_from(front).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split(':').next().unwrap().to_owned()
}

/// A keep-alive HTTP/1.1 backend: every request head (no bodies) gets `200` with body
/// `name`; the connection stays open until the client closes it.
fn http_backend(name: &'static str) -> SocketAddr {
    common::serve(move |mut s| {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                buf.drain(..end + 4);
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{name}",
                    name.len()
                );
                if s.write_all(answer.as_bytes()).is_err() {
                    return;
                }
            }
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
}

fn http_front(rt: &tokio::runtime::Runtime, http: bool) -> Arc<Proxy> {
    let cfg = ProxyConfig {
        http,
        ..ProxyConfig::default()
    };
    Proxy::bind("127.0.0.1:0".parse().unwrap(), cfg, rt.handle()).unwrap()
}

/// One request on `s`; the response head and body, read by its Content-Length.
fn get(s: &mut TcpStream) -> (String, String) {
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut b).unwrap(),
            1,
            "closed before the whole head: {head:?}"
        );
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    (head, String::from_utf8(body).unwrap())
}

#[test]
fn an_http_front_ends_a_draining_keep_alive_connection_after_its_next_response() {
    let rt = runtime();
    let p = http_front(&rt, true);
    p.set_upstreams(vec![("a".into(), http_backend("a"), 1)]);
    let mut s = TcpStream::connect(p.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (head, body) = get(&mut s);
    assert_eq!(body, "a");
    assert!(!head.contains("Connection: close"), "{head}");
    assert_eq!(p.active_to("a"), 1);
    // a is replaced by b: the open connection's next response says close, then it ends.
    p.set_upstreams(vec![("b".into(), http_backend("b"), 1)]);
    let (head, body) = get(&mut s);
    assert_eq!(body, "a", "the request in flight goes to its instance");
    assert!(head.contains("Connection: close\r\n"), "{head}");
    let mut rest = Vec::new();
    assert_eq!(
        s.read_to_end(&mut rest).unwrap(),
        0,
        "closed after the response, nothing more"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while p.active_to("a") > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        p.active_to("a"),
        0,
        "drained: the stop need not wait for the deadline"
    );
    // The client's next connection goes to b.
    let mut s = TcpStream::connect(p.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(get(&mut s).1, "b");
}

#[test]
fn an_idle_http_connection_to_a_draining_upstream_is_closed_and_a_tcp_one_is_not() {
    let rt = runtime();
    for http in [true, false] {
        let p = http_front(&rt, http);
        p.set_upstreams(vec![("a".into(), http_backend("a"), 1)]);
        let mut s = TcpStream::connect(p.local_addr()).unwrap();
        let wait = if http { 4000 } else { 1500 };
        s.set_read_timeout(Some(Duration::from_millis(wait)))
            .unwrap();
        assert_eq!(get(&mut s).1, "a");
        let began = std::time::Instant::now();
        p.set_upstreams(Vec::new());
        let mut rest = Vec::new();
        let got = s.read_to_end(&mut rest);
        if http {
            assert_eq!(got.unwrap(), 0, "closed, nothing sent");
            assert!(
                began.elapsed() >= Duration::from_millis(900),
                "quiet for IDLE_CLOSE first"
            );
            assert_eq!(p.active_to("a"), 0);
        } else {
            assert!(
                got.is_err(),
                "plain TCP: open until the peer closes (the read timed out)"
            );
            assert_eq!(p.active_to("a"), 1);
        }
    }
}

#[test]
fn an_http_front_passes_chunked_bodies_and_pipelined_requests_whole() {
    // A backend that answers in chunked coding, with a trailer, split over writes.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        let mut answered = 0;
        while answered < 2 {
            let n = s.read(&mut chunk).unwrap();
            buf.extend_from_slice(&chunk[..n]);
            while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                buf.drain(..end + 4);
                for part in [
                    &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab"[..],
                    b"c\r\n0\r\nX: y\r\n\r\n",
                ] {
                    s.write_all(part).unwrap();
                    std::thread::sleep(Duration::from_millis(20));
                }
                answered += 1;
            }
        }
    });
    let rt = runtime();
    let p = http_front(&rt, true);
    p.set_upstreams(vec![("a".into(), addr, 1)]);
    let mut s = TcpStream::connect(p.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let one = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX: y\r\n\r\n";
    let mut got = vec![0u8; one.len() * 2];
    s.read_exact(&mut got).unwrap();
    assert_eq!(String::from_utf8(got).unwrap(), one.repeat(2));
}
