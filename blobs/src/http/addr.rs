//! Which addresses a URL fetch may connect to.
//!
//! A URL input is fetched on a stranger's word from inside the provider's
//! network, so by default only globally reachable unicast addresses are
//! allowed: everything in the IANA special-purpose registries that is not
//! globally reachable (loopback, RFC 1918 and unique-local networks,
//! link-local including the cloud metadata address 169.254.169.254,
//! shared/CGNAT space, multicast, documentation, benchmarking and reserved
//! ranges) is refused. IPv6 forms that reach an IPv4 address (mapped,
//! NAT64, 6to4) are judged by that IPv4 address. `std`'s `is_global` is
//! not stable, hence this table.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why an address is not fetched from by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrClass {
    /// 127.0.0.0/8, ::1.
    Loopback,
    /// 10/8, 172.16/12, 192.168/16, 100.64/10 (shared, CGNAT), fc00::/7,
    /// fec0::/10.
    Private,
    /// 169.254/16 (cloud metadata services live there), fe80::/10.
    LinkLocal,
    /// 0.0.0.0/8, `::`.
    Unspecified,
    /// 224/4, 255.255.255.255, ff00::/8.
    Multicast,
    /// Documentation, benchmarking, protocol-assignment and reserved
    /// ranges: nothing a public URL points at.
    Reserved,
}

impl fmt::Display for AddrClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Loopback => "a loopback",
            Self::Private => "a private-network",
            Self::LinkLocal => "a link-local",
            Self::Unspecified => "an unspecified",
            Self::Multicast => "a multicast or broadcast",
            Self::Reserved => "a reserved (not globally reachable)",
        })
    }
}

/// `None` for a globally reachable unicast address, else why it is not.
pub fn classify(ip: IpAddr) -> Option<AddrClass> {
    match ip {
        IpAddr::V4(a) => classify_v4(a),
        IpAddr::V6(a) => classify_v6(a),
    }
}

fn classify_v4(a: Ipv4Addr) -> Option<AddrClass> {
    let n = u32::from(a);
    let within = |net: [u8; 4], bits: u32| {
        let mask = u32::MAX << (32 - bits);
        n & mask == u32::from(Ipv4Addr::from(net)) & mask
    };
    use AddrClass::*;
    let class = if within([0, 0, 0, 0], 8) {
        Unspecified
    } else if within([127, 0, 0, 0], 8) {
        Loopback
    } else if within([10, 0, 0, 0], 8)
        || within([172, 16, 0, 0], 12)
        || within([192, 168, 0, 0], 16)
        || within([100, 64, 0, 0], 10)
    {
        Private
    } else if within([169, 254, 0, 0], 16) {
        LinkLocal
    } else if within([224, 0, 0, 0], 4) || n == u32::MAX {
        Multicast
    } else if within([192, 0, 0, 0], 24)
        || within([192, 0, 2, 0], 24)
        || within([192, 88, 99, 0], 24)
        || within([198, 18, 0, 0], 15)
        || within([198, 51, 100, 0], 24)
        || within([203, 0, 113, 0], 24)
        || within([240, 0, 0, 0], 4)
    {
        Reserved
    } else {
        return None;
    };
    Some(class)
}

fn classify_v6(a: Ipv6Addr) -> Option<AddrClass> {
    if let Some(v4) = a.to_ipv4_mapped() {
        return classify_v4(v4); // ::ffff:a.b.c.d is that IPv4 address
    }
    let n = u128::from(a);
    let within = |net: u128, bits: u32| {
        let mask = u128::MAX << (128 - bits);
        n & mask == net & mask
    };
    let low32 = Ipv4Addr::from((n & 0xffff_ffff) as u32);
    use AddrClass::*;
    Some(if a.is_unspecified() {
        Unspecified
    } else if a.is_loopback() {
        Loopback
    } else if within(0x0064_ff9b << 96, 96) {
        // NAT64 (well-known prefix): reaches the embedded IPv4 address.
        return classify_v4(low32);
    } else if within(0x2002 << 112, 16) {
        // 6to4: the IPv4 address sits in bits 16..48.
        return classify_v4(Ipv4Addr::from((n >> 80) as u32));
    } else if within(0xfc00 << 112, 7) || within(0xfec0 << 112, 10) {
        Private
    } else if within(0xfe80 << 112, 10) {
        LinkLocal
    } else if within(0xff00 << 112, 8) {
        Multicast
    } else if within(0x2001 << 112, 23)
        || within(0x2001_0db8 << 96, 32)
        || within(0x3fff << 112, 20)
        || !within(0x2000 << 112, 3)
    {
        // IETF protocol assignments (Teredo among them), documentation,
        // and everything outside global unicast 2000::/3 (IPv4-compatible,
        // discard, local-use NAT64, ...).
        Reserved
    } else {
        return None;
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_global_addresses_are_classified_and_public_ones_pass() {
        use AddrClass::*;
        let cases: &[(&str, Option<AddrClass>)] = &[
            ("127.0.0.1", Some(Loopback)),
            ("127.255.1.2", Some(Loopback)),
            ("10.0.0.5", Some(Private)),
            ("172.16.0.1", Some(Private)),
            ("172.31.255.255", Some(Private)),
            ("192.168.1.1", Some(Private)),
            ("100.64.0.1", Some(Private)),
            ("169.254.169.254", Some(LinkLocal)),
            ("0.0.0.0", Some(Unspecified)),
            ("0.1.2.3", Some(Unspecified)),
            ("224.0.0.1", Some(Multicast)),
            ("255.255.255.255", Some(Multicast)),
            ("192.0.2.1", Some(Reserved)),
            ("198.18.0.1", Some(Reserved)),
            ("240.0.0.1", Some(Reserved)),
            ("::1", Some(Loopback)),
            ("::", Some(Unspecified)),
            ("fc00::1", Some(Private)),
            ("fd12:3456::1", Some(Private)),
            ("fe80::1", Some(LinkLocal)),
            ("ff02::1", Some(Multicast)),
            ("::ffff:127.0.0.1", Some(Loopback)),
            ("::ffff:169.254.169.254", Some(LinkLocal)),
            ("64:ff9b::a00:5", Some(Private)),
            ("2002:a00:5::1", Some(Private)),
            ("2001:db8::1", Some(Reserved)),
            ("2001::1", Some(Reserved)),
            ("::127.0.0.1", Some(Reserved)),
            ("100::1", Some(Reserved)),
            // Public: passes.
            ("8.8.8.8", None),
            ("172.32.0.1", None),
            ("1.1.1.1", None),
            ("2606:4700:4700::1111", None),
            ("::ffff:8.8.8.8", None),
            ("64:ff9b::808:808", None),
            ("2002:808:808::1", None),
        ];
        for (ip, want) in cases {
            let got = classify(ip.parse().unwrap());
            assert_eq!(got, *want, "{ip}");
        }
    }
}
