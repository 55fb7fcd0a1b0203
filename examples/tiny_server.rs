//! A tiny TCP server for `make bench-bringup`: listens on 127.0.0.1:$PORT, accepts
//! connections and closes them, until a signal ends it. The same workload the issue's
//! supervisord and circus figures were measured on, without any runtime start-up cost.

use std::net::TcpListener;

fn main() {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .expect("PORT must be a port number");
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind");
    for conn in listener.incoming() {
        drop(conn);
    }
}
