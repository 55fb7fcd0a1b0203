//! Port allocator: one or more ranges, reserved ports, dynamic and static
//! (named) allocation over a bitmap.
//!
//! Dynamic allocation hands out the next free port after the last one given,
//! wrapping around, and a released port first cools down in a short FIFO
//! (up to 64 ports, a quarter of the range at most) before it is free again,
//! so a port just released is not reused at once while others are free (a
//! client of the old holder may still be connecting to it), as Nomad and
//! Kubernetes avoid it too. When nothing else is free, the coolest port goes.
//! An optional bind check skips ports something else on the machine holds and
//! remembers them as held elsewhere until [`PortAllocator::refresh_external`].
//! Ports that other holders of the machine have claimed (other stacks, through a
//! machine ledger), listening or not, come in through [`PortAllocator::set_claimed`]
//! and are never handed out while claimed.
//!
//! ```
//! use corral_core::ports::PortAllocator;
//!
//! let ports = PortAllocator::new(&[(20000, 20009)], &[20000]).unwrap();
//! let a = ports.allocate().unwrap();
//! assert_eq!(a, 20001); // 20000 is reserved
//! ports.release(a).unwrap();
//! assert_eq!(ports.allocate().unwrap(), 20002); // not the one just released
//! let db = ports.allocate_static(20005, Some("db.http")).unwrap();
//! assert_eq!(db, 20005);
//! assert!(ports.allocate_static(20005, None).is_err());
//! ```

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};

use parking_lot::Mutex;

use crate::error::PortError;

const WORDS: usize = 65536 / 64;

/// A fixed 65536-bit set.
#[derive(Clone)]
struct Bits(Box<[u64; WORDS]>);

impl Bits {
    fn new() -> Self {
        Self(Box::new([0; WORDS]))
    }
    fn get(&self, p: u16) -> bool {
        self.0[p as usize / 64] >> (p % 64) & 1 == 1
    }
    fn set(&mut self, p: u16, v: bool) {
        let w = &mut self.0[p as usize / 64];
        if v {
            *w |= 1 << (p % 64);
        } else {
            *w &= !(1 << (p % 64));
        }
    }
    /// First set bit at or after `from`, wrapping once around the whole space.
    fn next_set(&self, from: u16) -> Option<u16> {
        let start_word = from as usize / 64;
        let first = self.0[start_word] & (!0u64 << (from % 64));
        if first != 0 {
            return Some((start_word * 64 + first.trailing_zeros() as usize) as u16);
        }
        for step in 1..=WORDS {
            let wi = (start_word + step) % WORDS;
            let w = self.0[wi];
            if w != 0 {
                return Some((wi * 64 + w.trailing_zeros() as usize) as u16);
            }
        }
        None
    }
}

/// Why a port in range is not free.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Holder {
    Named(String),
    Reserved,
    External(Option<String>),
}

struct Inner {
    /// Set bit: in a range and free to hand out.
    free: Bits,
    /// Where the next dynamic search starts.
    cursor: u16,
    free_count: usize,
    /// Released ports waiting before they are free again, oldest first; counted in `free_count`.
    cooling: VecDeque<u16>,
    /// Set bit: the port is in `cooling`.
    cool: Bits,
    /// Ports not free for a reason worth naming; dynamic allocations are not listed.
    holders: HashMap<u16, Holder>,
    /// Set bit: claimed by another holder of the machine (and so not free here).
    claimed: Bits,
    claimed_count: usize,
}

/// Hands out ports from a set of ranges. All methods take `&self` and are safe from many threads.
pub struct PortAllocator {
    ranges: Vec<(u16, u16)>,
    total: usize,
    cooling_cap: usize,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for PortAllocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortAllocator")
            .field("ranges", &self.ranges_text())
            .field("available", &self.available())
            .finish()
    }
}

impl Default for PortAllocator {
    /// The default range, 20000-32000, below the kernel's ephemeral ports.
    fn default() -> Self {
        Self::new(&[(20000, 32000)], &[]).expect("default range is valid")
    }
}

impl PortAllocator {
    /// An allocator over inclusive `ranges`; `reserved` ports are never handed out.
    pub fn new(ranges: &[(u16, u16)], reserved: &[u16]) -> Result<Self, PortError> {
        if ranges.is_empty() {
            return Err(PortError::InvalidRange("no range given".into()));
        }
        let mut free = Bits::new();
        for &(a, b) in ranges {
            if a > b {
                return Err(PortError::InvalidRange(format!("{a}-{b}: start after end")));
            }
            if a == 0 {
                return Err(PortError::InvalidRange(format!(
                    "{a}-{b}: port 0 is not allocatable"
                )));
            }
            for p in a..=b {
                free.set(p, true);
            }
        }
        let total = (0..WORDS).map(|w| free.0[w].count_ones() as usize).sum();
        let mut holders = HashMap::new();
        let mut free_count = total;
        for &p in reserved {
            if free.get(p) {
                free.set(p, false);
                free_count -= 1;
            }
            holders.insert(p, Holder::Reserved);
        }
        let mut sorted = ranges.to_vec();
        sorted.sort_unstable();
        Ok(Self {
            inner: Mutex::new(Inner {
                free,
                cursor: sorted[0].0,
                free_count,
                cooling: VecDeque::new(),
                cool: Bits::new(),
                holders,
                claimed: Bits::new(),
                claimed_count: 0,
            }),
            ranges: sorted,
            total,
            cooling_cap: (total / 4).min(64),
        })
    }

    /// The ranges as `start-end[,start-end...]`.
    pub fn ranges_text(&self) -> String {
        self.ranges
            .iter()
            .map(|(a, b)| format!("{a}-{b}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The configured inclusive ranges, sorted.
    pub fn ranges(&self) -> &[(u16, u16)] {
        &self.ranges
    }

    fn in_range(&self, port: u16) -> bool {
        self.ranges.iter().any(|&(a, b)| (a..=b).contains(&port))
    }

    fn exhausted(&self, inner: &Inner) -> PortError {
        PortError::Exhausted {
            ranges: self.ranges_text(),
            in_use: self.total - inner.free_count,
            total: self.total,
        }
    }

    /// The next free port after the last one handed out.
    pub fn allocate(&self) -> Result<u16, PortError> {
        let mut inner = self.inner.lock();
        if let Some(p) = inner.free.next_set(inner.cursor) {
            inner.free.set(p, false);
            inner.free_count -= 1;
            inner.cursor = p.wrapping_add(1);
            return Ok(p);
        }
        // Nothing else is free: the port released longest ago.
        let Some(p) = inner.cooling.pop_front() else {
            return Err(self.exhausted(&inner));
        };
        inner.cool.set(p, false);
        inner.free_count -= 1;
        Ok(p)
    }

    /// Like [`allocate`](Self::allocate), but first checks that the port can be
    /// bound on `addr`; ports something else holds are skipped and remembered
    /// as held elsewhere.
    pub fn allocate_checked(&self, addr: IpAddr) -> Result<u16, PortError> {
        loop {
            let p = self.allocate()?;
            match probe_bind(addr, p, false) {
                Ok(()) => return Ok(p),
                Err(holder) => {
                    let mut inner = self.inner.lock();
                    inner.holders.insert(p, Holder::External(holder));
                }
            }
        }
    }

    /// Allocates exactly `port`, recording `name` as its holder.
    pub fn allocate_static(&self, port: u16, name: Option<&str>) -> Result<u16, PortError> {
        if !self.in_range(port) {
            return Err(PortError::OutOfRange {
                port,
                ranges: self.ranges_text(),
            });
        }
        let mut inner = self.inner.lock();
        if inner.cool.get(port) {
            inner.cool.set(port, false);
            inner.cooling.retain(|&c| c != port);
            inner.free.set(port, true);
        }
        if inner.claimed.get(port) {
            return Err(PortError::InUse {
                port,
                holder: Some("another holder of the machine".into()),
            });
        }
        if !inner.free.get(port) {
            let holder = match inner.holders.get(&port) {
                Some(Holder::Named(n)) => Some(n.clone()),
                Some(Holder::Reserved) => Some("reserved".to_string()),
                Some(Holder::External(h)) => {
                    Some(h.clone().unwrap_or_else(|| "another process".into()))
                }
                None => Some("a dynamic allocation".into()),
            };
            return Err(PortError::InUse { port, holder });
        }
        inner.free.set(port, false);
        inner.free_count -= 1;
        if let Some(n) = name {
            inner.holders.insert(port, Holder::Named(n.to_string()));
        }
        Ok(port)
    }

    /// Like [`allocate_static`](Self::allocate_static), then checks the port can be bound on `addr`.
    pub fn allocate_static_checked(
        &self,
        port: u16,
        name: Option<&str>,
        addr: IpAddr,
    ) -> Result<u16, PortError> {
        self.allocate_static(port, name)?;
        // A port asked for by number is bound by whoever asked (corral's fronts set
        // SO_REUSEADDR): only a listener or an exclusive bind is in the way, not TIME_WAIT.
        if let Err(holder) = probe_bind(addr, port, true) {
            let mut inner = self.inner.lock();
            inner.holders.insert(port, Holder::External(holder.clone()));
            return Err(PortError::InUse {
                port,
                holder: Some(holder.unwrap_or_else(|| "another process".into())),
            });
        }
        Ok(port)
    }

    /// Returns a port to the pool. Reserved ports and ports never handed out are an error.
    pub fn release(&self, port: u16) -> Result<(), PortError> {
        let mut inner = self.inner.lock();
        if !self.in_range(port)
            || inner.free.get(port)
            || inner.cool.get(port)
            || inner.claimed.get(port)
        {
            return Err(PortError::NotAllocated { port });
        }
        match inner.holders.get(&port) {
            Some(Holder::Reserved | Holder::External(_)) => {
                return Err(PortError::NotAllocated { port })
            }
            Some(Holder::Named(_)) => {
                inner.holders.remove(&port);
            }
            None => {}
        }
        inner.free_count += 1;
        if self.cooling_cap == 0 {
            inner.free.set(port, true);
            return Ok(());
        }
        inner.cool.set(port, true);
        inner.cooling.push_back(port);
        if inner.cooling.len() > self.cooling_cap {
            let oldest = inner.cooling.pop_front().expect("non-empty");
            inner.cool.set(oldest, false);
            inner.free.set(oldest, true);
        }
        Ok(())
    }

    /// Re-checks ports remembered as held elsewhere and frees those now bindable on `addr`.
    /// Returns how many came back.
    pub fn refresh_external(&self, addr: IpAddr) -> usize {
        let candidates: Vec<u16> = {
            let inner = self.inner.lock();
            inner
                .holders
                .iter()
                .filter(|(_, h)| matches!(h, Holder::External(_)))
                .map(|(p, _)| *p)
                .collect()
        };
        let mut back = 0;
        for p in candidates {
            if probe_bind(addr, p, false).is_ok() {
                let mut inner = self.inner.lock();
                if matches!(inner.holders.get(&p), Some(Holder::External(_))) {
                    inner.holders.remove(&p);
                    inner.free.set(p, true);
                    inner.free_count += 1;
                    back += 1;
                }
            }
        }
        back
    }

    /// The ports other holders of the machine have claimed now, replacing the set given
    /// before: from now on they are not handed out, and those no longer claimed are free
    /// again. Ports out of range are of no concern; a port held here (allocated, reserved,
    /// or found held by a bind check) stays as it is. Returns how many claimed ports were
    /// held here already (0 when the machine's ledger and this one agree).
    pub fn set_claimed(&self, ports: &[u16]) -> usize {
        let mut want = Bits::new();
        for &p in ports {
            if self.in_range(p) {
                want.set(p, true);
            }
        }
        let mut inner = self.inner.lock();
        let mut clash = 0;
        for w in 0..WORDS {
            let changed = inner.claimed.0[w] ^ want.0[w];
            let mut bits = changed;
            while bits != 0 {
                let p = (w * 64 + bits.trailing_zeros() as usize) as u16;
                bits &= bits - 1;
                if want.get(p) {
                    if inner.cool.get(p) {
                        inner.cool.set(p, false);
                        inner.cooling.retain(|&c| c != p);
                        inner.free.set(p, true);
                    }
                    if !inner.free.get(p) {
                        clash += 1; // held here: the claim elsewhere is not ours to honour
                        continue;
                    }
                    inner.free.set(p, false);
                    inner.free_count -= 1;
                    inner.claimed.set(p, true);
                    inner.claimed_count += 1;
                } else {
                    inner.claimed.set(p, false);
                    inner.claimed_count -= 1;
                    inner.free.set(p, true);
                    inner.free_count += 1;
                }
            }
        }
        clash
    }

    /// Ports in range that other holders of the machine have claimed ([`Self::set_claimed`]).
    pub fn claimed(&self) -> usize {
        self.inner.lock().claimed_count
    }

    /// Whether `port` is currently allocated (or reserved, or held elsewhere).
    pub fn is_allocated(&self, port: u16) -> bool {
        let inner = self.inner.lock();
        self.in_range(port) && !inner.free.get(port) && !inner.cool.get(port)
    }

    /// Ports that can still be handed out.
    pub fn available(&self) -> usize {
        self.inner.lock().free_count
    }

    /// Ports in all ranges.
    pub fn capacity(&self) -> usize {
        self.total
    }

    /// Ports held through this allocator: allocated or reserved in range. Ports skipped
    /// because another process held them are [`held_elsewhere`](Self::held_elsewhere), and
    /// ports claimed by other holders [`claimed`](Self::claimed), not counted here, so a
    /// caller that released everything it took sees 0 whatever others on the machine took
    /// meanwhile.
    pub fn in_use(&self) -> usize {
        let inner = self.inner.lock();
        let external = inner
            .holders
            .values()
            .filter(|h| matches!(h, Holder::External(_)))
            .count();
        self.total - inner.free_count - external - inner.claimed_count
    }

    /// Ports skipped by [`allocate_checked`](Self::allocate_checked) because another
    /// process held them (until [`refresh_external`](Self::refresh_external) finds them free).
    pub fn held_elsewhere(&self) -> usize {
        self.inner
            .lock()
            .holders
            .values()
            .filter(|h| matches!(h, Holder::External(_)))
            .count()
    }
}

/// Binds and drops a listener; on failure, who holds the port, when that can be found.
///
/// A port handed out to a service (`reuse` false) is checked without `SO_REUSEADDR` (std's
/// `TcpListener::bind` sets it), as a server that does not set it binds: a port with
/// connections still in `TIME_WAIT` counts as taken, or that server would fail with
/// `EADDRINUSE` right after a restart.
fn probe_bind(addr: IpAddr, port: u16, reuse: bool) -> Result<(), Option<String>> {
    let sa = SocketAddr::new(addr, port);
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let bind = |reuse: bool| {
        socket2::Socket::new(domain, socket2::Type::STREAM, None).and_then(|s| {
            s.set_reuse_address(reuse)?;
            s.bind(&sa.into())
        })
    };
    if bind(reuse).is_ok() {
        return Ok(());
    }
    // Bindable with SO_REUSEADDR: only connections in TIME_WAIT are in the way, and no
    // listener to name. A busy machine has thousands of those; scanning /proc for each
    // (tens of ms with a long /proc/net/tcp) would make placement crawl.
    if !reuse && bind(true).is_ok() {
        return Err(Some("connections in TIME_WAIT".into()));
    }
    Err(listener_holder(port))
}

/// Finds the process listening on a TCP port through /proc (Linux), as "pid N (name)".
pub fn listener_holder(port: u16) -> Option<String> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 || cols[3] != "0A" {
                continue;
            }
            let local_port = cols[1]
                .rsplit(':')
                .next()
                .and_then(|h| u16::from_str_radix(h, 16).ok());
            if local_port == Some(port) {
                inodes.push(format!("socket:[{}]", cols[9]));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    let procs = std::fs::read_dir("/proc").ok()?;
    for entry in procs.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                if inodes.iter().any(|i| target.as_os_str() == i.as_str()) {
                    let comm = std::fs::read_to_string(entry.path().join("comm"))
                        .map(|s| s.trim().to_string())
                        .unwrap_or_default();
                    return Some(format!("pid {pid} ({comm})"));
                }
            }
        }
    }
    Some("another process".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn exhaustion_names_range_and_counts() {
        let p = PortAllocator::new(&[(20000, 20002)], &[]).unwrap();
        for _ in 0..3 {
            p.allocate().unwrap();
        }
        let e = p.allocate().unwrap_err();
        assert_eq!(
            e.to_string(),
            "port range 20000-20002 exhausted (3 of 3 in use)"
        );
    }

    #[test]
    fn cursor_avoids_immediate_reuse_and_wraps() {
        let p = PortAllocator::new(&[(100, 102)], &[]).unwrap();
        assert_eq!(p.allocate().unwrap(), 100);
        p.release(100).unwrap();
        assert_eq!(p.allocate().unwrap(), 101);
        assert_eq!(p.allocate().unwrap(), 102);
        assert_eq!(p.allocate().unwrap(), 100);
        // A released port cools down while others are free.
        let p = PortAllocator::new(&[(100, 119)], &[]).unwrap();
        let got: Vec<u16> = (0..20).map(|_| p.allocate().unwrap()).collect();
        p.release(got[5]).unwrap();
        p.release(got[0]).unwrap();
        p.release(got[1]).unwrap();
        assert_eq!(p.available(), 3);
        // Cooling holds 5 (a quarter of 20): the three wait, oldest handed out first when nothing else is free.
        assert_eq!(p.allocate().unwrap(), 105);
        assert!(!p.is_allocated(100));
    }

    #[test]
    fn multiple_ranges() {
        let p = PortAllocator::new(&[(300, 300), (100, 100)], &[]).unwrap();
        assert_eq!(p.capacity(), 2);
        let mut got = vec![p.allocate().unwrap(), p.allocate().unwrap()];
        got.sort_unstable();
        assert_eq!(got, vec![100, 300]);
        assert_eq!(p.ranges_text(), "100-100,300-300");
    }

    #[test]
    fn static_and_named() {
        let p = PortAllocator::new(&[(100, 110)], &[105]).unwrap();
        p.allocate_static(101, Some("db.http")).unwrap();
        match p.allocate_static(101, None).unwrap_err() {
            PortError::InUse { port, holder } => {
                assert_eq!(port, 101);
                assert_eq!(holder.as_deref(), Some("db.http"));
            }
            e => panic!("{e}"),
        }
        assert_eq!(
            p.allocate_static(105, None).unwrap_err().to_string(),
            "port 105 is in use by reserved"
        );
        assert!(matches!(
            p.allocate_static(99, None),
            Err(PortError::OutOfRange { .. })
        ));
        assert!(matches!(
            p.release(105),
            Err(PortError::NotAllocated { .. })
        ));
        p.release(101).unwrap();
        assert!(matches!(
            p.release(101),
            Err(PortError::NotAllocated { .. })
        ));
        assert_eq!(p.available(), 10);
    }

    #[test]
    fn invalid_ranges() {
        assert!(PortAllocator::new(&[], &[]).is_err());
        assert!(PortAllocator::new(&[(5, 4)], &[]).is_err());
        assert!(PortAllocator::new(&[(0, 4)], &[]).is_err());
    }

    #[test]
    fn bind_check_counts_a_port_in_time_wait_as_taken() {
        use std::io::Read;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (server_side, _) = listener.accept().unwrap();
        // The server closes first, so its end of the connection goes to TIME_WAIT on `port`.
        drop(server_side);
        let mut buf = [0u8; 1];
        assert_eq!(client.read(&mut buf).unwrap(), 0);
        drop(client);
        drop(listener);
        let addr: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(
            probe_bind(addr, port, false),
            Err(Some("connections in TIME_WAIT".into())),
            "told apart from a listener without a scan of /proc"
        );
        let p = PortAllocator::new(&[(port, port.saturating_add(1))], &[]).unwrap();
        let got = p.allocate_checked(addr).unwrap();
        assert_ne!(
            got, port,
            "a port in TIME_WAIT is not free for a server without SO_REUSEADDR"
        );
        assert_eq!(p.held_elsewhere(), 1);
    }

    #[test]
    fn bind_check_skips_held_port_and_names_holder() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let p = PortAllocator::new(&[(port, port.saturating_add(1))], &[]).unwrap();
        let addr: IpAddr = "127.0.0.1".parse().unwrap();
        let got = p.allocate_checked(addr).unwrap();
        assert_ne!(got, port);
        assert!(p.is_allocated(port));
        assert_eq!((p.in_use(), p.held_elsewhere()), (1, 1));
        p.release(got).unwrap();
        // What this allocator handed out is back; the port another process holds is not ours.
        assert_eq!((p.in_use(), p.held_elsewhere()), (0, 1));
        match p.allocate_static(port, None).unwrap_err() {
            PortError::InUse { holder, .. } => {
                let h = holder.unwrap();
                assert!(h.contains(&format!("pid {}", std::process::id())), "{h}");
            }
            e => panic!("{e}"),
        }
        drop(held);
        // The port let go is seen free (other tests bind ephemeral ports beside it: look again
        // for a moment rather than once).
        for _ in 0..200 {
            p.refresh_external(addr);
            if !p.is_allocated(port) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!p.is_allocated(port));
    }
}
