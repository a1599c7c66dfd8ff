//! Transports of addresses: which are QUIC or relayed, the IP they start
//! with, the QUIC listen address that goes with a TCP one, and the order
//! addresses are dialled in.
//!
//! A node listens on TCP and QUIC (with the `quic` feature, on by
//! default). [`with_quic_listeners`] turns the listen addresses a user
//! gave into the ones the node listens on: a list with no QUIC address in
//! it gets, for each plain TCP address, the QUIC address on the same IP
//! and the same port number over UDP (`/ip4/0.0.0.0/tcp/4001` →
//! `+ /ip4/0.0.0.0/udp/4001/quic-v1`; port 0 gets a port of its own on
//! each). A list that names any QUIC address is taken as given: the user
//! chose the transports.
//!
//! QUIC is preferred where a peer has both ([`prefer_quic`]): its
//! handshake is one round trip (TCP + noise + yamux take several), it
//! carries streams without head-of-line blocking, and it is what hole
//! punching succeeds with most. Addresses are handed to libp2p QUIC
//! first; libp2p dials a peer's addresses concurrently and keeps the
//! first connection that completes, which is QUIC's when both work.

use std::net::IpAddr;

use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;

/// Whether `addr` goes through a relay (has a `/p2p-circuit` component).
pub(crate) fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

/// The IP `addr` starts with (`/ip4/..` or `/ip6/..`; `None` for a DNS
/// name, `/memory`, or a bare `/p2p/..`).
pub(crate) fn leading_ip(addr: &Multiaddr) -> Option<IpAddr> {
    match addr.iter().next()? {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    }
}

/// Whether `addr` is a QUIC address (`.../udp/<port>/quic-v1`).
pub fn is_quic(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::QuicV1))
}

/// The QUIC address matching a plain TCP address (`/ip4|ip6/<ip>/tcp/<port>`,
/// optionally ending in `/p2p/<id>`): same IP, same port number over UDP.
/// `None` for anything else (DNS names, websockets, QUIC already).
pub fn quic_twin(addr: &Multiaddr) -> Option<Multiaddr> {
    let mut parts = addr.iter();
    let ip = match parts.next()? {
        p @ (Protocol::Ip4(_) | Protocol::Ip6(_)) => p,
        _ => return None,
    };
    let Protocol::Tcp(port) = parts.next()? else {
        return None;
    };
    let mut twin = Multiaddr::empty()
        .with(ip)
        .with(Protocol::Udp(port))
        .with(Protocol::QuicV1);
    match parts.next() {
        None => {}
        Some(p @ Protocol::P2p(_)) => twin.push(p),
        Some(_) => return None,
    }
    parts.next().is_none().then_some(twin)
}

/// The addresses a node listens on for the `listen` addresses it was
/// given (see the module doc): unchanged when any is QUIC or when this
/// build has no QUIC transport, else each TCP address followed by its
/// [`quic_twin`].
pub fn with_quic_listeners(listen: &[Multiaddr]) -> Vec<Multiaddr> {
    if !cfg!(feature = "quic") || listen.iter().any(is_quic) {
        return listen.to_vec();
    }
    let mut out = Vec::with_capacity(listen.len() * 2);
    for a in listen {
        out.push(a.clone());
        if let Some(twin) = quic_twin(a) {
            if !out.contains(&twin) {
                out.push(twin);
            }
        }
    }
    out
}

/// Orders `addrs` QUIC first, keeping the order within each transport
/// (a stable sort), so that dials and announcements try QUIC first.
pub fn prefer_quic(addrs: &mut [Multiaddr]) {
    addrs.sort_by_key(|a| !is_quic(a));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_tcp_address_has_a_quic_twin_on_the_same_port() {
        assert_eq!(
            quic_twin(&a("/ip4/127.0.0.1/tcp/4001")),
            Some(a("/ip4/127.0.0.1/udp/4001/quic-v1"))
        );
        assert_eq!(
            quic_twin(&a("/ip6/::/tcp/0")),
            Some(a("/ip6/::/udp/0/quic-v1"))
        );
        let id = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN";
        assert_eq!(
            quic_twin(&a(&format!("/ip4/10.0.0.1/tcp/7/p2p/{id}"))),
            Some(a(&format!("/ip4/10.0.0.1/udp/7/quic-v1/p2p/{id}")))
        );
        assert_eq!(quic_twin(&a("/dns4/example.com/tcp/4001")), None);
        assert_eq!(quic_twin(&a("/ip4/127.0.0.1/tcp/4001/ws")), None);
        assert_eq!(quic_twin(&a("/ip4/127.0.0.1/udp/4001/quic-v1")), None);
    }

    #[test]
    fn listeners_get_quic_unless_the_user_chose_transports() {
        let tcp = [a("/ip4/0.0.0.0/tcp/0"), a("/ip4/127.0.0.1/tcp/4001")];
        let got = with_quic_listeners(&tcp);
        if cfg!(feature = "quic") {
            assert_eq!(
                got,
                vec![
                    a("/ip4/0.0.0.0/tcp/0"),
                    a("/ip4/0.0.0.0/udp/0/quic-v1"),
                    a("/ip4/127.0.0.1/tcp/4001"),
                    a("/ip4/127.0.0.1/udp/4001/quic-v1"),
                ]
            );
        } else {
            assert_eq!(got, tcp.to_vec());
        }
        // Any QUIC address given: exactly what was given.
        let mixed = [a("/ip4/127.0.0.1/tcp/1"), a("/ip4/127.0.0.1/udp/2/quic-v1")];
        assert_eq!(with_quic_listeners(&mixed), mixed.to_vec());
        let quic_only = [a("/ip4/127.0.0.1/udp/0/quic-v1")];
        assert_eq!(with_quic_listeners(&quic_only), quic_only.to_vec());
    }

    #[test]
    fn quic_addresses_come_first_in_their_order() {
        let mut v = vec![
            a("/ip4/1.1.1.1/tcp/1"),
            a("/ip4/2.2.2.2/udp/2/quic-v1"),
            a("/ip4/3.3.3.3/tcp/3"),
            a("/ip4/4.4.4.4/udp/4/quic-v1"),
        ];
        prefer_quic(&mut v);
        assert_eq!(
            v,
            vec![
                a("/ip4/2.2.2.2/udp/2/quic-v1"),
                a("/ip4/4.4.4.4/udp/4/quic-v1"),
                a("/ip4/1.1.1.1/tcp/1"),
                a("/ip4/3.3.3.3/tcp/3"),
            ]
        );
    }
}
