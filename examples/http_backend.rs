//! Small HTTP backends for `make bench-proxy`: one process listening on each port given,
//! answering every request with `200 ok`, keeping the connection unless the request says
//! `Connection: close`. Single-threaded, so its CPU stays on the core it is pinned to.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn serve(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut buf = vec![0u8; 8192];
    let mut filled = 0;
    loop {
        let Ok(n) = s.read(&mut buf[filled..]).await else {
            return;
        };
        if n == 0 {
            return;
        }
        filled += n;
        // Answer every complete request in the buffer (wrk may pipeline nothing, but be safe).
        while let Some(end) = buf[..filled].windows(4).position(|w| w == b"\r\n\r\n") {
            let head = &buf[..end];
            let close = head
                .windows(17)
                .any(|w| w.eq_ignore_ascii_case(b"connection: close"));
            let resp: &[u8] = if close {
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            };
            if s.write_all(resp).await.is_err() || close {
                return;
            }
            buf.copy_within(end + 4..filled, 0);
            filled -= end + 4;
        }
        if filled == buf.len() {
            return;
        }
    }
}

fn main() {
    let ports: Vec<u16> = std::env::args()
        .skip(1)
        .map(|p| p.parse().expect("ports"))
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for port in ports {
            let l = TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
            tasks.push(tokio::spawn(async move {
                loop {
                    if let Ok((s, _)) = l.accept().await {
                        tokio::spawn(serve(s));
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
}
