//! The addresses providers join with, as `kiln-coordinator run` prints them.
//!
//! A coordinator listening on an unspecified address (`/ip4/0.0.0.0/…`,
//! `/ip6/::/…`) takes connections on every interface, but libp2p reports
//! the listener by one interface's address, usually loopback's, which no
//! other machine can dial. [`join_addrs`] (pure) replaces it with one
//! address per real interface of the machine, best first; [`interfaces`]
//! and [`default_route_ip`] are what it is given.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket};

use kiln_net::Addr;
use kiln_net::multiaddr::Protocol;

/// One address of one network interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub ip: IpAddr,
    /// Operationally up (a bridge without members is down).
    pub up: bool,
}

/// This machine's interface addresses (none if they cannot be listed).
pub fn interfaces() -> Vec<Interface> {
    match if_addrs::get_if_addrs() {
        Ok(list) => list
            .into_iter()
            .map(|i| Interface {
                up: i.is_oper_up(),
                ip: i.ip(),
                name: i.name,
            })
            .collect(),
        Err(e) => {
            tracing::debug!("cannot list network interfaces: {e}");
            Vec::new()
        }
    }
}

/// The source address this machine would use towards the rest of the
/// internet (its default route's interface), found by connecting a UDP
/// socket to a documentation address: a route lookup, no packet is sent.
/// `None` without such a route.
pub fn default_route_ip(v6: bool) -> Option<IpAddr> {
    let socket = if v6 {
        UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).ok()?
    } else {
        UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?
    };
    let probe: IpAddr = if v6 {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1))
    } else {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))
    };
    socket.connect((probe, 9)).ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// Interfaces of container and VM bridges, reachable only from this
/// machine's own containers and VMs.
fn is_local_bridge(name: &str) -> bool {
    [
        "docker", "br-", "virbr", "veth", "cni", "flannel", "cali", "podman", "lxcbr", "lxdbr",
        "vboxnet", "vmnet",
    ]
    .iter()
    .any(|p| name.starts_with(p))
}

/// Whether another machine could dial `ip`: not loopback, unspecified,
/// multicast or link-local (an IPv6 link-local address needs a zone a
/// multiaddr cannot carry).
fn dialable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            !(a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || a.is_link_local()
                || a.is_broadcast())
        }
        IpAddr::V6(a) => {
            !(a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || a.is_unicast_link_local())
        }
    }
}

/// The addresses to print for providers to join a coordinator configured to
/// listen on `configured`, whose network reported `bound` (each ending in
/// `/p2p/<peer id>`, its port the one really bound). For an unspecified
/// listen address: one address per dialable interface address of the same
/// family in `interfaces`, best first (`preferred`, the default route's
/// source address; then interfaces that are up; container and VM bridges
/// last); loopback only when the machine has nothing else. Any other listen
/// address is printed as bound.
pub fn join_addrs(
    configured: &Addr,
    bound: &[Addr],
    interfaces: &[Interface],
    preferred: Option<IpAddr>,
) -> Vec<Addr> {
    let v6 = match configured.iter().next() {
        Some(Protocol::Ip4(a)) if a.is_unspecified() => false,
        Some(Protocol::Ip6(a)) if a.is_unspecified() => true,
        _ => return bound.to_vec(),
    };
    let mut candidates: Vec<&Interface> = interfaces
        .iter()
        .filter(|i| i.ip.is_ipv6() == v6 && dialable(i.ip))
        .collect();
    // Stable: the machine's own order within each rank.
    candidates.sort_by_key(|i| (Some(i.ip) != preferred, !i.up, is_local_bridge(&i.name)));
    let mut ips: Vec<IpAddr> = Vec::new();
    for i in candidates {
        if !ips.contains(&i.ip) {
            ips.push(i.ip);
        }
    }
    if ips.is_empty() {
        ips.push(if v6 {
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        } else {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        });
    }
    let mut out = Vec::new();
    for b in bound {
        let mut parts = b.iter();
        match parts.next() {
            Some(Protocol::Ip4(_)) if !v6 => {}
            Some(Protocol::Ip6(_)) if v6 => {}
            // Not an address of the listener asked for: as reported.
            _ => {
                out.push(b.clone());
                continue;
            }
        }
        let rest: Vec<Protocol<'_>> = parts.collect();
        for ip in &ips {
            let mut a = Addr::from(*ip);
            for p in &rest {
                a.push(p.clone());
            }
            if !out.contains(&a) {
                out.push(a);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const PEER: &str = "12D3KooWEyoppNCUx8Yx66oV9fJnriXwCcXwDDUA2kj6vnc6iDEp";

    fn iface(name: &str, ip: &str, up: bool) -> Interface {
        Interface {
            name: name.into(),
            ip: ip.parse().unwrap(),
            up,
        }
    }

    fn addr(s: &str) -> Addr {
        s.parse().unwrap()
    }

    fn ips(addrs: &[Addr]) -> Vec<String> {
        addrs
            .iter()
            .map(|a| {
                let s = a.to_string();
                assert!(s.ends_with(&format!("/tcp/4730/p2p/{PEER}")), "{s}");
                s.split('/').nth(2).unwrap().to_string()
            })
            .collect()
    }

    #[test]
    fn an_unspecified_listener_is_joined_at_the_machines_real_addresses() {
        let machine = [
            iface("lo", "127.0.0.1", true),
            iface("lo", "::1", true),
            iface("docker0", "172.17.0.1", true),
            iface("eth0", "192.0.2.2", true),
            iface("eth0", "fd00::2", true),
            iface("eth0", "fe80::fc:ff:fe00:1", true),
            iface("wlan0", "10.0.0.7", false),
            iface("eth1", "169.254.3.4", true),
            iface("tailscale0", "100.64.0.9", true),
        ];
        let bound = [addr(&format!("/ip4/127.0.0.1/tcp/4730/p2p/{PEER}"))];
        let any4 = addr("/ip4/0.0.0.0/tcp/4730");
        // (preferred, the addresses printed, best first)
        let cases: [(Option<&str>, &[&str]); 3] = [
            (None, &["192.0.2.2", "100.64.0.9", "172.17.0.1", "10.0.0.7"]),
            (
                Some("100.64.0.9"),
                &["100.64.0.9", "192.0.2.2", "172.17.0.1", "10.0.0.7"],
            ),
            // A preferred address no interface has changes nothing.
            (
                Some("203.0.113.5"),
                &["192.0.2.2", "100.64.0.9", "172.17.0.1", "10.0.0.7"],
            ),
        ];
        for (preferred, want) in cases {
            let got = join_addrs(
                &any4,
                &bound,
                &machine,
                preferred.map(|p| p.parse().unwrap()),
            );
            assert_eq!(ips(&got), want, "preferred {preferred:?}");
        }
        // IPv6: neither loopback nor link-local.
        let bound6 = [addr(&format!("/ip6/::1/tcp/4730/p2p/{PEER}"))];
        let got = join_addrs(&addr("/ip6/::/tcp/4730"), &bound6, &machine, None);
        assert_eq!(ips(&got), ["fd00::2"]);
    }

    #[test]
    fn loopback_is_kept_only_when_the_machine_has_nothing_else() {
        let bound = [addr(&format!("/ip4/127.0.0.1/tcp/4730/p2p/{PEER}"))];
        let any4 = addr("/ip4/0.0.0.0/tcp/4730");
        for machine in [
            vec![],
            vec![iface("lo", "127.0.0.1", true)],
            vec![
                iface("lo", "127.0.0.1", true),
                iface("eth0", "fe80::1", true),
                iface("eth1", "169.254.1.1", true),
            ],
        ] {
            let got = join_addrs(&any4, &bound, &machine, None);
            assert_eq!(ips(&got), ["127.0.0.1"], "{machine:?}");
        }
        let bound6 = [addr(&format!("/ip6/::1/tcp/4730/p2p/{PEER}"))];
        let got = join_addrs(&addr("/ip6/::/tcp/4730"), &bound6, &[], None);
        assert_eq!(ips(&got), ["::1"]);
    }

    #[test]
    fn a_specific_listen_address_is_printed_as_bound() {
        let machine = [iface("eth0", "192.0.2.2", true)];
        for (configured, bound) in [
            ("/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/tcp/4730"),
            ("/ip4/192.0.2.2/tcp/4730", "/ip4/192.0.2.2/tcp/4730"),
            ("/ip6/fd00::2/tcp/4730", "/ip6/fd00::2/tcp/4730"),
        ] {
            let bound = [addr(&format!("{bound}/p2p/{PEER}"))];
            let got = join_addrs(&addr(configured), &bound, &machine, None);
            assert_eq!(got, bound, "{configured}");
        }
    }

    #[test]
    fn this_machines_own_facts_never_fail() {
        // Whatever the machine has: a list (possibly empty), and a default
        // route's address that is one of its interfaces when there is one.
        let all = interfaces();
        if let Some(ip) = default_route_ip(false) {
            assert!(all.iter().any(|i| i.ip == ip), "{ip} not in {all:?}");
        }
    }
}
