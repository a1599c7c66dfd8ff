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
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade};
use nakshatra_swarm::{spawn, IdentityKeypair, Multiaddr, StreamProtocol};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::compat::TokioAsyncReadCompatExt;

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
    let transport = std::env::var("TRANSPORT").unwrap_or_else(|_| "tcp".into());
    let server_key = IdentityKeypair::generate_ed25519();
    let (server, addr, tcp_addr, noise_addr) = server_rt.block_on(async {
        let mut cfg = config(None);
        cfg.listen
            .push("/ip4/127.0.0.1/udp/0/quic-v1".parse().expect("multiaddr"));
        let (c, _task) = spawn(server_key.clone(), cfg).await.expect("spawn");
        let a = c.listen_addrs().await.expect("addrs");
        let a = a
            .iter()
            .find(|a| a.to_string().contains(&format!("/{transport}")))
            .expect("a listen address of TRANSPORT");
        let addr: Multiaddr = format!("{}/p2p/{}", a, c.peer_id())
            .parse()
            .expect("multiaddr");
        let noise_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let noise_addr = noise_listener.local_addr().expect("local addr");
        let key = server_key.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = noise_listener.accept().await {
                let _ = s.set_nodelay(true);
                let key = key.clone();
                tokio::spawn(async move {
                    let noise = libp2p::noise::Config::new(&key).expect("noise");
                    let (_peer, mut s) = noise
                        .upgrade_inbound(s.compat(), "/noise")
                        .await
                        .expect("handshake");
                    let mut buf = vec![0u8; bytes];
                    while s.read_exact(&mut buf).await.is_ok() {
                        if s.write_all(&buf).await.is_err() || s.flush().await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
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
        (c, addr, tcp_addr, noise_addr)
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
        let raw = tokio::net::TcpStream::connect(noise_addr)
            .await
            .expect("connect");
        raw.set_nodelay(true).expect("nodelay");
        let client_key = IdentityKeypair::generate_ed25519();
        let (_peer, mut noise) = libp2p::noise::Config::new(&client_key)
            .expect("noise")
            .upgrade_outbound(raw.compat(), "/noise")
            .await
            .expect("handshake");
        let mut noise_us = Vec::new();
        let msg = vec![7u8; bytes];
        let mut back = vec![0u8; bytes];
        let (mut p2p_us, mut tcp_us) = (Vec::new(), Vec::new());
        for r in 0..rounds {
            for which in [r % 3, (r + 1) % 3, (r + 2) % 3] {
                for _ in 0..n {
                    if !gap.is_zero() {
                        tokio::time::sleep(gap).await;
                    }
                    let t = Instant::now();
                    if which == 2 {
                        noise.write_all(&msg).await.expect("write");
                        noise.flush().await.expect("flush");
                        noise.read_exact(&mut back).await.expect("read");
                        noise_us.push(t.elapsed().as_secs_f64() * 1e6);
                    } else if which == 0 {
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
        let (n50, n99) = (quantile(&mut noise_us, 0.5), quantile(&mut noise_us, 0.99));
        println!("noise over TCP           {n50:>9.1} {n99:>9.1}");
        println!("libp2p stream ({transport:<4})     {q50:>9.1} {q99:>9.1}");
        println!(
            "added per round trip     {:>9.1}   (two links: {:.1} µs a link)",
            q50 - p50,
            (q50 - p50) / 2.0
        );
    });
}
