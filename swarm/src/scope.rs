//! Which addresses this node may dial: a peer's claims (an identify
//! report, a record's listen addresses, an `Open` naming the next hop)
//! must not turn the node into a port scanner of its own host or LAN.
//!
//! An address is in scope unless it is on a network this node is not on:
//!
//! - a loopback address only when this node is on loopback only (a local
//!   swarm: every listen address is loopback) or was told to bootstrap
//!   from a loopback address;
//! - a private, link-local or unique-local address only when this node
//!   listens on such a network itself (a LAN node) or bootstraps from one;
//! - public addresses and DNS names always.
//!
//! A node listening on `0.0.0.0` reports `127.0.0.1` among its listen
//! addresses; that alone does not put it "on loopback".

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;

/// The kind of network an IP address is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// This host only.
    Loopback,
    /// A LAN: RFC 1918, CGNAT, link-local, IPv6 unique/link-local.
    Private,
    /// Anything else (public IPs, DNS names, non-IP transports).
    Public,
}

/// The networks this node is on (see the module doc).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scope {
    /// Loopback addresses may be dialled.
    pub loopback: bool,
    /// Private addresses may be dialled.
    pub private: bool,
}

impl Scope {
    /// The scope of a node listening on `listen` and bootstrapping from
    /// `bootstrap`.
    pub fn of<'a>(
        listen: impl IntoIterator<Item = &'a Multiaddr>,
        bootstrap: impl IntoIterator<Item = &'a Multiaddr>,
    ) -> Scope {
        let listen: Vec<Reach> = listen.into_iter().map(reach).collect();
        let boot: Vec<Reach> = bootstrap.into_iter().map(reach).collect();
        let only_loopback = !listen.is_empty() && listen.iter().all(|r| *r == Reach::Loopback);
        Scope {
            loopback: only_loopback || boot.contains(&Reach::Loopback),
            private: listen.contains(&Reach::Private) || boot.contains(&Reach::Private),
        }
    }

    /// Whether `addr` may be dialled.
    pub fn allows(&self, addr: &Multiaddr) -> bool {
        match reach(addr) {
            Reach::Loopback => self.loopback,
            Reach::Private => self.private,
            Reach::Public => true,
        }
    }
}

/// The network `addr`'s first component is on.
pub fn reach(addr: &Multiaddr) -> Reach {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => reach_ip(IpAddr::V4(ip)),
        Some(Protocol::Ip6(ip)) => reach_ip(IpAddr::V6(ip)),
        // In-process (simulations): as near as loopback.
        Some(Protocol::Memory(_)) => Reach::Loopback,
        _ => Reach::Public,
    }
}

fn reach_ip(ip: IpAddr) -> Reach {
    match ip {
        IpAddr::V4(ip) => reach_v4(ip),
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => reach_v4(v4),
            None => reach_v6(ip),
        },
    }
}

fn reach_v4(ip: Ipv4Addr) -> Reach {
    let [a, b, ..] = ip.octets();
    if ip.is_loopback() || ip.is_unspecified() {
        Reach::Loopback
    } else if ip.is_private() || ip.is_link_local() || (a == 100 && (64..128).contains(&b)) {
        // 100.64.0.0/10: carrier-grade NAT, a provider's private network.
        Reach::Private
    } else {
        Reach::Public
    }
}

fn reach_v6(ip: Ipv6Addr) -> Reach {
    let first = ip.segments()[0];
    if ip.is_loopback() || ip.is_unspecified() {
        Reach::Loopback
    } else if first & 0xfe00 == 0xfc00 || first & 0xffc0 == 0xfe80 {
        // fc00::/7 unique local, fe80::/10 link-local.
        Reach::Private
    } else {
        Reach::Public
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    #[test]
    fn reach_of_addresses() {
        assert_eq!(reach(&a("/ip4/127.0.0.1/tcp/1")), Reach::Loopback);
        assert_eq!(reach(&a("/ip4/0.0.0.0/tcp/1")), Reach::Loopback);
        assert_eq!(reach(&a("/ip6/::1/tcp/1")), Reach::Loopback);
        assert_eq!(reach(&a("/ip6/::ffff:127.0.0.1/tcp/1")), Reach::Loopback);
        for p in [
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.0.1",
            "100.64.0.1",
        ] {
            assert_eq!(reach(&a(&format!("/ip4/{p}/tcp/1"))), Reach::Private, "{p}");
        }
        assert_eq!(reach(&a("/ip6/fd00::1/tcp/1")), Reach::Private);
        assert_eq!(reach(&a("/ip6/fe80::1/tcp/1")), Reach::Private);
        assert_eq!(reach(&a("/ip4/8.8.8.8/tcp/1")), Reach::Public);
        assert_eq!(reach(&a("/ip4/100.128.0.1/tcp/1")), Reach::Public);
        assert_eq!(reach(&a("/dns4/example.com/tcp/1")), Reach::Public);
        assert_eq!(reach(&a("/memory/1234")), Reach::Loopback);
    }

    #[test]
    fn a_public_node_dials_no_loopback_or_lan_address() {
        let listen = [a("/ip4/203.0.113.7/tcp/4000"), a("/ip4/127.0.0.1/tcp/4000")];
        let boot = [a("/ip4/198.51.100.1/tcp/4000")];
        let s = Scope::of(&listen, &boot);
        assert!(!s.allows(&a("/ip4/127.0.0.1/tcp/22")));
        assert!(!s.allows(&a("/ip4/10.0.0.5/tcp/22")));
        assert!(s.allows(&a("/ip4/198.51.100.9/tcp/4000")));
    }

    #[test]
    fn local_and_lan_swarms_dial_their_own_networks() {
        let local = Scope::of(&[a("/ip4/127.0.0.1/tcp/4000")], &[]);
        assert!(local.allows(&a("/ip4/127.0.0.1/tcp/4001")));
        assert!(!local.allows(&a("/ip4/192.168.1.2/tcp/4001")));
        let lan = Scope::of(
            &[a("/ip4/192.168.1.2/tcp/4000"), a("/ip4/127.0.0.1/tcp/4000")],
            &[],
        );
        assert!(lan.allows(&a("/ip4/192.168.1.3/tcp/4000")));
        assert!(!lan.allows(&a("/ip4/127.0.0.1/tcp/4001")));
        // QUIC addresses are judged by their IP, as TCP ones are.
        assert!(local.allows(&a("/ip4/127.0.0.1/udp/4001/quic-v1")));
        assert!(!local.allows(&a("/ip4/192.168.1.2/udp/4001/quic-v1")));
        let quic_local = Scope::of(&[a("/ip4/127.0.0.1/udp/4000/quic-v1")], &[]);
        assert!(quic_local.allows(&a("/ip4/127.0.0.1/tcp/4001")));
        assert!(quic_local.allows(&a("/ip4/127.0.0.1/udp/4001/quic-v1")));
        let quic_asker = Scope::of(&[], &[a("/ip4/127.0.0.1/udp/4000/quic-v1")]);
        assert!(quic_asker.allows(&a("/ip4/127.0.0.1/udp/4001/quic-v1")));
        assert!(!quic_asker.allows(&a("/ip4/10.0.0.1/udp/4001/quic-v1")));
        // A client (no listen address) bootstrapping from loopback.
        let asker = Scope::of(&[], &[a("/ip4/127.0.0.1/tcp/4000")]);
        assert!(asker.allows(&a("/ip4/127.0.0.1/tcp/4001")));
        assert!(!asker.allows(&a("/ip4/10.0.0.1/tcp/4001")));
    }
}
