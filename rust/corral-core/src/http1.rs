//! HTTP/1.x message framing for the front: just enough to know where each request and
//! response begins and ends, so that a connection to an instance that is being drained can
//! end at a message boundary (`Connection: close` on the next response, as Envoy and
//! `HAProxy` do for HTTP/1), never in the middle of a message.
//!
//! A [`Framer`] reads one direction of a connection. [`Framer::next`] cuts what was read
//! into [`Piece`]s, in order: bytes to pass on as they are, a whole message head (held
//! until its empty line arrives, so a header can be added to it), and the end of a
//! message. Bodies are framed by `Content-Length` or chunked transfer coding (trailers
//! included); a response to `HEAD`, a 1xx, 204 or 304 has none; a response with neither
//! runs to the end of the connection. An upgrade (`101`, `CONNECT`), a head larger than
//! [`MAX_HEAD`] or anything it cannot parse turns the framer raw: from there on it passes
//! everything on and reports no boundary, and the connection is drained as plain TCP.
//!
//! ```
//! use corral_core::http1::{Framer, Piece, Role};
//!
//! let mut f = Framer::new(Role::Response);
//! let data = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi";
//! let mut pos = 0;
//! assert_eq!(f.next(data, &mut pos), Some(Piece::Head));
//! assert!(f.head().ends_with(b"\r\n\r\n"));
//! assert_eq!(f.next(data, &mut pos), Some(Piece::Bytes(data.len() - 2..data.len())));
//! assert_eq!(f.next(data, &mut pos), Some(Piece::End));
//! assert_eq!(f.next(data, &mut pos), None);
//! ```

use std::collections::VecDeque;
use std::ops::Range;

/// The largest message head held whole; a larger one turns the framer raw.
pub const MAX_HEAD: usize = 64 * 1024;

/// Which direction a framer reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Client to server.
    Request,
    /// Server to client.
    Response,
}

/// One cut of what was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Bytes of the input to pass on as they are.
    Bytes(Range<usize>),
    /// A whole message head is in [`Framer::head`] (raw: what was held when it gave up).
    Head,
    /// The message ended here.
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    Body(u64),
    ChunkSize {
        size: u64,
        digits: bool,
        ext: bool,
        cr: bool,
    },
    ChunkData(u64),
    ChunkEnd(u8),
    Trailers {
        line_empty: bool,
        cr: bool,
    },
    UntilClose,
    Raw,
}

/// See the [module docs](self).
// Four independent facts about one direction (not a mode that an enum would name better).
#[allow(clippy::struct_excessive_bools)]
#[derive(Debug)]
pub struct Framer {
    role: Role,
    state: State,
    head: Vec<u8>,
    /// The head in `head` is whole (passed on): the next one starts afresh.
    head_done: bool,
    end_pending: bool,
    /// Responses: whether each request awaiting its response was a `HEAD`.
    expect: VecDeque<bool>,
    last_status: u16,
    last_head_method: bool,
    raw_after_head: bool,
}

impl Framer {
    /// A framer at the start of a connection.
    #[must_use]
    pub fn new(role: Role) -> Self {
        Framer {
            role,
            state: State::Head,
            head: Vec::new(),
            head_done: false,
            end_pending: false,
            expect: VecDeque::new(),
            last_status: 0,
            last_head_method: false,
            raw_after_head: false,
        }
    }

    /// The last head, whole, `\r\n\r\n` included (valid after [`Piece::Head`]).
    #[must_use]
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    /// What it holds of a head not yet whole (passed on as it is when the connection ends).
    #[must_use]
    pub fn held(&self) -> &[u8] {
        if self.head_done {
            &[]
        } else {
            &self.head
        }
    }

    /// Whether it gave up on framing (an upgrade, a head too large, bad syntax).
    #[must_use]
    pub fn is_raw(&self) -> bool {
        self.state == State::Raw
    }

    /// Between messages, nothing of the next one read yet.
    #[must_use]
    pub fn is_idle(&self) -> bool {
        self.state == State::Head && (self.head.is_empty() || self.head_done) && !self.end_pending
    }

    /// The status of the last response head (responses).
    #[must_use]
    pub fn status(&self) -> u16 {
        self.last_status
    }

    /// Whether the last request head was a `HEAD` (requests).
    #[must_use]
    pub fn was_head_method(&self) -> bool {
        self.last_head_method
    }

    /// Responses: the next request awaiting its response was (`true`) a `HEAD`.
    pub fn expect(&mut self, head_method: bool) {
        self.expect.push_back(head_method);
    }

    /// The next piece of `data` from `*pos` on (advancing it), or None once all of it is
    /// taken.
    pub fn next(&mut self, data: &[u8], pos: &mut usize) -> Option<Piece> {
        if self.end_pending {
            self.end_pending = false;
            if self.raw_after_head {
                self.state = State::Raw;
            }
            return Some(Piece::End);
        }
        if *pos >= data.len() {
            return None;
        }
        let start = *pos;
        match self.state {
            State::Raw | State::UntilClose => {
                *pos = data.len();
                Some(Piece::Bytes(start..data.len()))
            }
            State::Head => self.read_head(data, pos),
            State::Body(left) => {
                let take = usize::try_from(left)
                    .unwrap_or(usize::MAX)
                    .min(data.len() - start);
                *pos += take;
                let left = left - take as u64;
                if left == 0 {
                    self.state = State::Head;
                    self.end_pending = true;
                } else {
                    self.state = State::Body(left);
                }
                Some(Piece::Bytes(start..*pos))
            }
            _ => {
                self.scan_chunked(data, pos);
                Some(Piece::Bytes(start..*pos))
            }
        }
    }

    fn read_head(&mut self, data: &[u8], pos: &mut usize) -> Option<Piece> {
        let rest = &data[*pos..];
        if self.head_done {
            self.head.clear();
            self.head_done = false;
        }
        // Skip the empty lines a peer may send between messages (RFC 9112 2.2).
        if self.head.is_empty() {
            let blank = rest
                .iter()
                .take_while(|b| **b == b'\r' || **b == b'\n')
                .count();
            if blank > 0 {
                let start = *pos;
                *pos += blank;
                return Some(Piece::Bytes(start..*pos));
            }
        }
        let before = self.head.len();
        // The end may straddle reads: look from three bytes back.
        let from = before.saturating_sub(3);
        self.head.extend_from_slice(rest);
        let found = find(&self.head[from..], b"\r\n\r\n").map(|i| from + i + 4);
        let Some(end) = found else {
            *pos = data.len();
            if self.head.len() > MAX_HEAD {
                self.state = State::Raw;
                self.head_done = true; // passed on as it is
                return Some(Piece::Head);
            }
            return None;
        };
        self.head.truncate(end);
        self.head_done = true;
        *pos += end - before;
        if self.parse_head().is_none() {
            self.state = State::Raw;
        }
        Some(Piece::Head)
    }

    /// Sets the body state from the head just read; None when it cannot be framed.
    fn parse_head(&mut self) -> Option<()> {
        let text = std::str::from_utf8(&self.head).ok()?;
        let mut lines = text.split("\r\n");
        let first = lines.next()?;
        let mut parts = first.splitn(3, ' ');
        let (a, b) = (parts.next()?, parts.next()?);
        let mut length: Option<u64> = None;
        let mut chunked = false;
        let mut upgrade = false;
        for line in lines.take_while(|l| !l.is_empty()) {
            let (name, value) = line.split_once(':')?;
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                let n: u64 = value.parse().ok()?;
                if length.is_some_and(|m| m != n) {
                    return None;
                }
                length = Some(n);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value
                    .rsplit(',')
                    .next()
                    .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
                if !chunked {
                    return None; // a coding we cannot frame
                }
            } else if name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        let body = if chunked {
            State::ChunkSize {
                size: 0,
                digits: false,
                ext: false,
                cr: false,
            }
        } else {
            match length {
                Some(0) | None => State::Head,
                Some(n) => State::Body(n),
            }
        };
        match self.role {
            Role::Request => {
                let token = a.bytes().all(|c| c.is_ascii_uppercase() || c == b'-');
                if !token || !(first.ends_with("HTTP/1.1") || first.ends_with("HTTP/1.0")) {
                    return None;
                }
                self.last_head_method = a == "HEAD";
                self.raw_after_head = upgrade || a == "CONNECT";
                self.finish_head(body);
            }
            Role::Response => {
                if !a.starts_with("HTTP/1.") {
                    return None;
                }
                let status: u16 = b.parse().ok()?;
                self.last_status = status;
                if status == 101 {
                    self.state = State::Raw;
                    return Some(());
                }
                if (100..200).contains(&status) {
                    self.state = State::Head; // interim: the final response follows
                    return Some(());
                }
                let head_method = self.expect.pop_front().unwrap_or(false);
                if head_method || status == 204 || status == 304 {
                    self.finish_head(State::Head);
                } else if !chunked && length.is_none() {
                    self.state = State::UntilClose;
                } else {
                    self.finish_head(body);
                }
            }
        }
        Some(())
    }

    fn finish_head(&mut self, body: State) {
        self.state = body;
        if body == State::Head {
            self.end_pending = true;
        }
    }

    /// Chunked coding: advances `*pos` to the end of the message or of `data`.
    fn scan_chunked(&mut self, data: &[u8], pos: &mut usize) {
        while *pos < data.len() {
            match self.state {
                State::ChunkData(left) => {
                    let take = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(data.len() - *pos);
                    *pos += take;
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        State::ChunkEnd(0)
                    } else {
                        State::ChunkData(left)
                    };
                }
                State::ChunkEnd(seen) => {
                    let want = if seen == 0 { b'\r' } else { b'\n' };
                    if data[*pos] != want {
                        self.state = State::Raw;
                        return;
                    }
                    *pos += 1;
                    self.state = if seen == 0 {
                        State::ChunkEnd(1)
                    } else {
                        State::ChunkSize {
                            size: 0,
                            digits: false,
                            ext: false,
                            cr: false,
                        }
                    };
                }
                State::ChunkSize {
                    size,
                    digits,
                    ext,
                    cr,
                } => {
                    let c = data[*pos];
                    *pos += 1;
                    self.state = match (c, cr) {
                        (b'\n', true) if digits => {
                            if size == 0 {
                                State::Trailers {
                                    line_empty: true,
                                    cr: false,
                                }
                            } else {
                                State::ChunkData(size)
                            }
                        }
                        (b'\r', false) => State::ChunkSize {
                            size,
                            digits,
                            ext,
                            cr: true,
                        },
                        (_, false) if ext => State::ChunkSize {
                            size,
                            digits,
                            ext,
                            cr,
                        },
                        (b';' | b' ' | b'\t', false) if digits => State::ChunkSize {
                            size,
                            digits,
                            ext: true,
                            cr,
                        },
                        (_, false) if c.is_ascii_hexdigit() && size < (1 << 56) => {
                            let v = u64::from(char::from(c).to_digit(16).unwrap_or(0));
                            State::ChunkSize {
                                size: size * 16 + v,
                                digits: true,
                                ext,
                                cr,
                            }
                        }
                        _ => State::Raw,
                    };
                    if self.state == State::Raw {
                        return;
                    }
                }
                State::Trailers { line_empty, cr } => {
                    let c = data[*pos];
                    *pos += 1;
                    self.state = match (c, cr) {
                        (b'\r', false) => State::Trailers {
                            line_empty,
                            cr: true,
                        },
                        (b'\n', true) if line_empty => {
                            self.state = State::Head;
                            self.end_pending = true;
                            return;
                        }
                        (b'\n', true) => State::Trailers {
                            line_empty: true,
                            cr: false,
                        },
                        (_, false) => State::Trailers {
                            line_empty: false,
                            cr: false,
                        },
                        _ => State::Raw,
                    };
                    if self.state == State::Raw {
                        return;
                    }
                }
                _ => return,
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `head` with `Connection: close` added before its empty line.
#[must_use]
pub fn with_close(head: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len() + 19);
    out.extend_from_slice(&head[..head.len() - 2]);
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every piece of `chunks` fed in turn: `H` for a head, `E` for an end, the bytes as text.
    fn cut(f: &mut Framer, chunks: &[&[u8]]) -> String {
        let mut out = String::new();
        for data in chunks {
            let mut pos = 0;
            while let Some(p) = f.next(data, &mut pos) {
                match p {
                    Piece::Bytes(r) => out.push_str(&String::from_utf8_lossy(&data[r])),
                    Piece::Head => {
                        out.push_str("[H ");
                        out.push_str(&String::from_utf8_lossy(f.head()).replace("\r\n", "|"));
                        out.push(']');
                    }
                    Piece::End => out.push_str("[E]"),
                }
            }
        }
        out
    }

    #[test]
    fn content_length_and_keep_alive_requests_in_one_read() {
        let mut f = Framer::new(Role::Request);
        let got = cut(&mut f, &[b"GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST /p HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET"]);
        assert_eq!(
            got,
            "[H GET / HTTP/1.1|Host: a||][E][H POST /p HTTP/1.1|Content-Length: 3||]abc[E]"
        );
        assert!(!f.is_idle(), "GET of the next one is held");
        let got = cut(&mut f, &[b" /x HTTP/1.1\r", b"\n\r", b"\n"]);
        assert_eq!(got, "[H GET /x HTTP/1.1||][E]");
        assert!(f.is_idle());
    }

    #[test]
    fn chunked_with_extensions_and_trailers_split_everywhere() {
        let whole: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nT: v\r\n\r\n";
        for split in 1..whole.len() {
            let mut f = Framer::new(Role::Response);
            f.expect(false);
            let got = cut(&mut f, &[&whole[..split], &whole[split..]]);
            assert!(
                got.ends_with("5;x=y\r\nhello\r\n0\r\nT: v\r\n\r\n[E]"),
                "split at {split}: {got}"
            );
            assert!(f.is_idle() && !f.is_raw());
        }
    }

    #[test]
    fn responses_without_a_body() {
        let mut f = Framer::new(Role::Response);
        f.expect(true); // HEAD
        f.expect(false);
        f.expect(false);
        let got = cut(&mut f, &[b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n"]);
        assert_eq!(got.matches("[E]").count(), 3, "{got}");
        assert!(
            got.starts_with("[H HTTP/1.1 100 Continue||][H HTTP/1.1 200"),
            "1xx is no end: {got}"
        );
        assert!(f.is_idle());
    }

    #[test]
    fn upgrades_unframed_bodies_and_garbage_turn_raw_or_run_to_close() {
        let mut f = Framer::new(Role::Response);
        f.expect(false);
        cut(
            &mut f,
            &[b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"],
        );
        assert!(f.is_raw());
        let mut f = Framer::new(Role::Response);
        f.expect(false);
        let got = cut(&mut f, &[b"HTTP/1.0 200 OK\r\n\r\nuntil close", b"more"]);
        assert!(
            got.ends_with("until closemore") && !got.contains("[E]"),
            "{got}"
        );
        let mut f = Framer::new(Role::Request);
        cut(&mut f, &[b"\x16\x03\x01 not http at all\r\n\r\n"]);
        assert!(f.is_raw());
        let mut f = Framer::new(Role::Request);
        let big = vec![b'a'; MAX_HEAD + 10];
        cut(&mut f, &[b"GET / HTTP/1.1\r\nX: ", &big]);
        assert!(f.is_raw());
        let mut f = Framer::new(Role::Request);
        cut(
            &mut f,
            &[b"GET / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"],
        );
        assert!(f.is_raw(), "a coding it cannot frame");
    }

    #[test]
    fn with_close_adds_the_header_before_the_empty_line() {
        assert_eq!(
            with_close(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n"),
            b"HTTP/1.1 200 OK\r\nA: b\r\nConnection: close\r\n\r\n"
        );
    }
}
