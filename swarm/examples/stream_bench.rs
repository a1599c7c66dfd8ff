//! Raw stream throughput between two nodes on loopback (TCP + noise +
//! yamux, as nakshatra runs them): the ceiling for fetching pieces, with no
//! disk, hashing or framing of ours in the way.
//!
//! Each node has its own tokio runtime (as two processes would). For 1, 2
//! and 4 parallel streams on one connection, the sender writes `MB` (200)
//! megabytes in 2 MiB writes and the receiver reads and drops them; prints
//! MB/s, the best of `ROUNDS` (3).
//!
//! Run: `cargo run --release -p nakshatra-swarm --example stream_bench`

mod common;

use std::time::Instant;

use common::{config, runtime};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use nakshatra_swarm::{spawn, Client, IdentityKeypair, Multiaddr, StreamProtocol};

const PROTOCOL: &str = "/nakshatra/bench-stream/1";
const WRITE: usize = 2 << 20;

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (mb, rounds) = (env("MB", 200), env("ROUNDS", 3));
    let total = mb * 1_000_000;

    // Receiver: its own runtime, accepts streams and drains them.
    let rx_rt = runtime();
    let (rx, addr): (Client, Multiaddr) = rx_rt.block_on(async {
        let (c, _task) = spawn(IdentityKeypair::generate_ed25519(), config(None))
            .await
            .expect("spawn");
        let a = c.listen_addrs().await.expect("addrs");
        let addr = format!("{}/p2p/{}", a[0], c.peer_id())
            .parse()
            .expect("multiaddr");
        (c, addr)
    });
    let mut incoming = rx
        .stream_control()
        .accept(StreamProtocol::new(PROTOCOL))
        .expect("accept");
    rx_rt.spawn(async move {
        while let Some((_peer, mut s)) = incoming.next().await {
            tokio::spawn(async move {
                // Ready: the sender starts once it reads this byte.
                if s.write_all(b"r").await.is_err() || s.flush().await.is_err() {
                    return;
                }
                let mut buf = vec![0u8; WRITE];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
                let _ = s.write_all(b"k").await;
                let _ = s.close().await;
            });
        }
    });

    // Sender.
    let tx_rt = runtime();
    tx_rt.block_on(async {
        let (tx, _task) = spawn(IdentityKeypair::generate_ed25519(), config(Some(addr)))
            .await
            .expect("spawn");
        let peer = rx.peer_id();
        let _ = tx.probe_rtt(peer).await;
        println!("stream bench: {mb} MB per run over one TCP+noise+yamux connection on loopback, best of {rounds}");
        for streams in [1usize, 2, 4] {
            let mut best = 0f64;
            for _ in 0..rounds {
                let t0 = Instant::now();
                let each = total / streams;
                let jobs: Vec<_> = (0..streams)
                    .map(|_| {
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            // A receiver whose backlog is full drops a new
                            // stream: open until one says it is ready.
                            let mut tries = 0;
                            let mut s = loop {
                                let mut s = tx
                                    .open_stream(peer, StreamProtocol::new(PROTOCOL))
                                    .await
                                    .expect("open");
                                let mut ready = [0u8; 1];
                                if s.read_exact(&mut ready).await.is_ok() {
                                    break s;
                                }
                                tries += 1;
                                assert!(tries < 10, "the receiver keeps dropping streams");
                            };
                            let data = vec![7u8; WRITE];
                            let mut left = each;
                            while left > 0 {
                                let n = left.min(WRITE);
                                s.write_all(&data[..n]).await.expect("write");
                                left -= n;
                            }
                            s.close().await.expect("close");
                            let mut ack = [0u8; 1];
                            s.read_exact(&mut ack).await.expect("ack");
                        })
                    })
                    .collect();
                for j in jobs {
                    j.await.expect("stream");
                }
                best = best.max(total as f64 / 1e6 / t0.elapsed().as_secs_f64());
            }
            println!("{streams} stream(s)  {best:>7.0} MB/s");
        }
    });
}
