//! Round-trip time of one hidden-state-sized message between two nodes on
//! loopback: over a libp2p stream (TCP + noise + yamux, as a chain's hops
//! talk) and over a bare TCP socket, side by side in one run. What the
//! difference shows is what the libp2p stack adds to each link of a chain
//! step (`docs/speed.md`).
//!
//! Each side has its own tokio runtime of two workers (as a node process
//! has). The client writes `BYTES` (2,304: one row of a 576-wide f32 hidden
//! state) and the server echoes it; `ROUNDS` (5) interleaved rounds of
//! `N` (2,000) round trips each, then medians and p99 over every round trip.
//! `GAP_US` (0) sleeps that long between round trips: a chain's hop waits
//! milliseconds for the other hops' compute between two steps of its
//! own, and its threads go to sleep meanwhile.
//!
//! Run: `cargo run --release -p nakshatra-swarm --example rtt_bench`

mod common;

use std::time::Instant;

use common::{config, runtime};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use nakshatra_swarm::{spawn, IdentityKeypair, Multiaddr, StreamProtocol};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const PROTOCOL: &str = "/nakshatra/bench-rtt/1";

fn quantile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(((v.len().saturating_sub(1)) as f64 * p).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

fn main() {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (bytes, n, rounds) = (env("BYTES", 2304), env("N", 2000), env("ROUNDS", 5));
    let gap = std::time::Duration::from_micros(env("GAP_US", 0) as u64);

    // Server side: a libp2p node echoing streams, and a TCP echo server.
    let server_rt = runtime();
    let (server, addr, tcp_addr) = server_rt.block_on(async {
        let (c, _task) = spawn(IdentityKeypair::generate_ed25519(), config(None))
            .await
            .expect("spawn");
        let a = c.listen_addrs().await.expect("addrs");
        let addr: Multiaddr = format!("{}/p2p/{}", a[0], c.peer_id())
            .parse()
            .expect("multiaddr");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let tcp_addr = listener.local_addr().expect("local addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let _ = s.set_nodelay(true);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; bytes];
                    while s.read_exact(&mut buf).await.is_ok() {
                        if s.write_all(&buf).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        (c, addr, tcp_addr)
    });
    let mut incoming = server
        .stream_control()
        .accept(StreamProtocol::new(PROTOCOL))
        .expect("accept");
    server_rt.spawn(async move {
        while let Some((_peer, mut s)) = incoming.next().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; bytes];
                while s.read_exact(&mut buf).await.is_ok() {
                    if s.write_all(&buf).await.is_err() || s.flush().await.is_err() {
                        break;
                    }
                }
            });
        }
    });

    // Client side.
    let client_rt = runtime();
    client_rt.block_on(async {
        let (client, _task) = spawn(IdentityKeypair::generate_ed25519(), config(Some(addr)))
            .await
            .expect("spawn");
        let peer = server.peer_id();
        let _ = client.probe_rtt(peer).await;
        let mut stream = client
            .open_stream(peer, StreamProtocol::new(PROTOCOL))
            .await
            .expect("open");
        let mut tcp = tokio::net::TcpStream::connect(tcp_addr)
            .await
            .expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        let msg = vec![7u8; bytes];
        let mut back = vec![0u8; bytes];
        let (mut p2p_us, mut tcp_us) = (Vec::new(), Vec::new());
        for r in 0..rounds {
            for p2p_first in [r % 2 == 0, r % 2 != 0] {
                for _ in 0..n {
                    if !gap.is_zero() {
                        tokio::time::sleep(gap).await;
                    }
                    let t = Instant::now();
                    if p2p_first {
                        stream.write_all(&msg).await.expect("write");
                        stream.flush().await.expect("flush");
                        stream.read_exact(&mut back).await.expect("read");
                        p2p_us.push(t.elapsed().as_secs_f64() * 1e6);
                    } else {
                        tcp.write_all(&msg).await.expect("write");
                        tcp.read_exact(&mut back).await.expect("read");
                        tcp_us.push(t.elapsed().as_secs_f64() * 1e6);
                    }
                }
            }
        }
        println!(
            "rtt bench: {bytes}-byte echo on loopback, {rounds} interleaved rounds of {n} round trips, {} µs apart",
            gap.as_micros()
        );
        println!("                         median µs    p99 µs");
        let (p50, p99) = (quantile(&mut tcp_us, 0.5), quantile(&mut tcp_us, 0.99));
        println!("bare TCP                 {p50:>9.1} {p99:>9.1}");
        let (q50, q99) = (quantile(&mut p2p_us, 0.5), quantile(&mut p2p_us, 0.99));
        println!("libp2p stream            {q50:>9.1} {q99:>9.1}");
        println!(
            "added per round trip     {:>9.1}   (two links: {:.1} µs a link)",
            q50 - p50,
            (q50 - p50) / 2.0
        );
    });
}
