//! Where a webhook may be sent: the class of an IP address and the operator's allow-list.
//!
//! A webhook URL comes from whoever may request a recovery, and the orchestrator posts to it
//! from inside the network it runs in. Without a check, a URL could aim that POST at the
//! orchestrator's own host, at a cloud metadata service or at any internal server. So every
//! address a webhook host resolves to is classified ([`classify`]), and a delivery is refused
//! ([`AllowList::vet`]) when any of them is not a public address, unless the operator listed
//! the host name, the address or a network containing it (`[orchestrator] webhook_allow`).
//!
//! Everything here is pure: no name resolution, no clock. [`super::webhook`] resolves the host,
//! asks [`AllowList::vet`] and then connects only to the addresses it returned.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// What kind of address an IP address is, as far as sending a webhook to it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    /// Routable on the internet: a webhook may go there.
    Public,
    /// `127.0.0.0/8`, `::1`: this host.
    Loopback,
    /// `169.254.0.0/16` (where cloud metadata services answer), `fe80::/10`.
    LinkLocal,
    /// RFC 1918 (`10/8`, `172.16/12`, `192.168/16`), unique local `fc00::/7` and the
    /// deprecated site-local `fec0::/10`.
    Private,
    /// Carrier-grade NAT space, `100.64.0.0/10` (RFC 6598).
    SharedCgnat,
    /// `0.0.0.0/8` and `::`: "this network", which reaches this host on most systems.
    Unspecified,
    /// `224.0.0.0/4`, `ff00::/8`.
    Multicast,
    /// `255.255.255.255`.
    Broadcast,
}

impl AddressClass {
    /// Whether a webhook may go to an address of this class without being allow-listed.
    pub fn is_public(self) -> bool {
        self == AddressClass::Public
    }
}

impl fmt::Display for AddressClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddressClass::Public => "a public address",
            AddressClass::Loopback => "a loopback address",
            AddressClass::LinkLocal => "a link-local address",
            AddressClass::Private => "a private address",
            AddressClass::SharedCgnat => "a carrier-grade NAT address (100.64.0.0/10)",
            AddressClass::Unspecified => "an unspecified address",
            AddressClass::Multicast => "a multicast address",
            AddressClass::Broadcast => "the broadcast address",
        })
    }
}

/// The class of `ip`. An IPv6 address that embeds an IPv4 address (IPv4-mapped
/// `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d`, NAT64 `64:ff9b::a.b.c.d`) has the class of
/// the IPv4 address, since that is where a packet to it ends up.
pub fn classify(ip: IpAddr) -> AddressClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    let [a, b, _, _] = ip.octets();
    if a == 0 {
        AddressClass::Unspecified
    } else if a == 127 {
        AddressClass::Loopback
    } else if a == 169 && b == 254 {
        AddressClass::LinkLocal
    } else if a == 10 || (a == 172 && (16..=31).contains(&b)) || (a == 192 && b == 168) {
        AddressClass::Private
    } else if a == 100 && (64..=127).contains(&b) {
        AddressClass::SharedCgnat
    } else if ip == Ipv4Addr::BROADCAST {
        AddressClass::Broadcast
    } else if (224..=239).contains(&a) {
        AddressClass::Multicast
    } else {
        AddressClass::Public
    }
}

fn classify_v6(ip: Ipv6Addr) -> AddressClass {
    if ip.is_unspecified() {
        return AddressClass::Unspecified;
    }
    if ip.is_loopback() {
        return AddressClass::Loopback;
    }
    if let Some(v4) = embedded_v4(ip) {
        return classify_v4(v4);
    }
    let first = ip.segments()[0];
    if first & 0xffc0 == 0xfe80 {
        AddressClass::LinkLocal
    } else if first & 0xfe00 == 0xfc00 || first & 0xffc0 == 0xfec0 {
        AddressClass::Private
    } else if first & 0xff00 == 0xff00 {
        AddressClass::Multicast
    } else {
        AddressClass::Public
    }
}

/// The IPv4 address inside an IPv4-mapped, IPv4-compatible or NAT64 (well-known prefix)
/// IPv6 address.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s[..6] {
        [0, 0, 0, 0, 0, 0xffff] | [0, 0, 0, 0, 0, 0] | [0x64, 0xff9b, 0, 0, 0, 0] => Some(tail),
        _ => None,
    }
}

/// One entry of the allow-list: a host name, or an address or network (an address is a
/// network of one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowEntry {
    /// A host name, lower case, without a trailing dot: every address it resolves to is
    /// allowed.
    Host(String),
    /// An address (`127.0.0.1`, `::1`) or a CIDR network (`10.0.0.0/8`, `fd00::/8`).
    Net(IpNet),
}

impl AllowEntry {
    /// Parses `127.0.0.1`, `10.0.0.0/8`, `fd00::/8` or `hooks.internal`.
    pub fn parse(text: &str) -> Result<AllowEntry, String> {
        let entry = text.trim();
        if entry.is_empty() {
            return Err("an allow-list entry must not be empty".into());
        }
        if entry.contains('/') {
            return entry
                .parse::<IpNet>()
                .map(|net| AllowEntry::Net(net.trunc()))
                .map_err(|_| {
                    format!(
                        "{entry:?} is not a network: write an address and a prefix length, \
                         e.g. 10.0.0.0/8 or fd00::/8"
                    )
                });
        }
        if let Ok(ip) = entry.parse::<IpAddr>() {
            return Ok(AllowEntry::Net(IpNet::from(ip)));
        }
        let name = entry
            .strip_suffix('.')
            .unwrap_or(entry)
            .to_ascii_lowercase();
        let label_ok = |label: &str| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        if name.len() > 253 || !name.split('.').all(label_ok) {
            return Err(format!(
                "{entry:?} is neither an IP address, a network like 10.0.0.0/8, nor a host name"
            ));
        }
        Ok(AllowEntry::Host(name))
    }
}

impl fmt::Display for AllowEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllowEntry::Host(name) => f.write_str(name),
            AllowEntry::Net(net) if net.prefix_len() == net.max_prefix_len() => {
                write!(f, "{}", net.addr())
            }
            AllowEntry::Net(net) => write!(f, "{net}"),
        }
    }
}

impl std::str::FromStr for AllowEntry {
    type Err = String;

    fn from_str(text: &str) -> Result<AllowEntry, String> {
        AllowEntry::parse(text)
    }
}

/// The hosts, addresses and networks a webhook may reach although they are not public.
/// Empty by default: only public addresses are reached.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    entries: Vec<AllowEntry>,
}

/// Why a delivery is refused: the first address of the host that is neither public nor
/// allow-listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub address: IpAddr,
    pub class: AddressClass,
}

impl AllowList {
    pub fn new(entries: Vec<AllowEntry>) -> AllowList {
        AllowList { entries }
    }

    /// Parses every entry; the error names the first bad one.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<AllowList, String> {
        entries
            .iter()
            .map(|e| AllowEntry::parse(e.as_ref()))
            .collect::<Result<Vec<_>, _>>()
            .map(AllowList::new)
    }

    pub fn entries(&self) -> &[AllowEntry] {
        &self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether the host name `host` itself is listed (case and a trailing dot do not matter).
    fn lists_host(&self, host: &str) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host);
        self.entries
            .iter()
            .any(|e| matches!(e, AllowEntry::Host(name) if name.eq_ignore_ascii_case(host)))
    }

    /// Whether `ip` (or the IPv4 address an IPv6 address embeds) lies in a listed network.
    fn lists_address(&self, ip: IpAddr) -> bool {
        let embedded = match ip {
            IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        self.entries.iter().any(|e| match e {
            AllowEntry::Net(net) => {
                net.contains(&ip) || embedded.is_some_and(|v4| net.contains(&v4))
            }
            AllowEntry::Host(_) => false,
        })
    }

    /// Decides whether a webhook to `host`, which resolved to `addresses`, may be sent: every
    /// address must be public or allow-listed (one bad answer among good ones is enough to
    /// refuse, since the connection could go to any of them), unless the host name itself is
    /// listed. The addresses to connect to are exactly the ones given.
    pub fn vet(&self, host: &str, addresses: &[IpAddr]) -> Result<(), Refusal> {
        if self.lists_host(host) {
            return Ok(());
        }
        for &address in addresses {
            let class = classify(address);
            if !class.is_public() && !self.lists_address(address) {
                return Err(Refusal { address, class });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(text: &str) -> AddressClass {
        classify(text.parse().unwrap())
    }

    #[test]
    fn ipv4_addresses_are_classified() {
        use AddressClass::*;
        for (address, expected) in [
            ("8.8.8.8", Public),
            ("1.1.1.1", Public),
            ("93.184.216.34", Public),
            ("0.0.0.0", Unspecified),
            ("0.1.2.3", Unspecified),
            ("127.0.0.1", Loopback),
            ("127.255.255.254", Loopback),
            ("169.254.169.254", LinkLocal),
            ("10.0.0.1", Private),
            ("10.255.255.255", Private),
            ("172.15.255.255", Public),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("172.32.0.0", Public),
            ("192.168.1.1", Private),
            ("192.169.0.1", Public),
            ("100.63.255.255", Public),
            ("100.64.0.1", SharedCgnat),
            ("100.127.255.255", SharedCgnat),
            ("100.128.0.0", Public),
            ("224.0.0.1", Multicast),
            ("239.255.255.250", Multicast),
            ("255.255.255.255", Broadcast),
        ] {
            assert_eq!(class(address), expected, "{address}");
        }
    }

    #[test]
    fn ipv6_addresses_are_classified() {
        use AddressClass::*;
        for (address, expected) in [
            ("2606:4700:4700::1111", Public),
            ("2001:db8::1", Public),
            ("::", Unspecified),
            ("::1", Loopback),
            ("fe80::1", LinkLocal),
            ("febf::1", LinkLocal),
            ("fc00::1", Private),
            ("fd12:3456::1", Private),
            ("fec0::1", Private),
            ("ff02::1", Multicast),
            ("fbff::1", Public),
        ] {
            assert_eq!(class(address), expected, "{address}");
        }
    }

    #[test]
    fn ipv6_forms_of_ipv4_addresses_have_the_ipv4_class() {
        use AddressClass::*;
        for (address, expected) in [
            ("::ffff:127.0.0.1", Loopback),
            ("::ffff:7f00:1", Loopback),
            ("::ffff:10.1.2.3", Private),
            ("::ffff:169.254.169.254", LinkLocal),
            ("::ffff:100.64.0.1", SharedCgnat),
            ("::ffff:0.0.0.0", Unspecified),
            ("::ffff:224.0.0.1", Multicast),
            ("::ffff:8.8.8.8", Public),
            ("::127.0.0.1", Loopback),
            ("::192.168.0.1", Private),
            ("64:ff9b::10.0.0.1", Private),
            ("64:ff9b::8.8.8.8", Public),
            // Not an embedding form: the prefix differs.
            ("::fffe:7f00:1", Public),
        ] {
            assert_eq!(class(address), expected, "{address}");
        }
    }

    #[test]
    fn allow_entries_parse_and_bad_ones_are_named() {
        assert_eq!(
            AllowEntry::parse("127.0.0.1").unwrap().to_string(),
            "127.0.0.1"
        );
        assert_eq!(AllowEntry::parse("::1").unwrap().to_string(), "::1");
        assert_eq!(
            AllowEntry::parse("10.1.2.3/8").unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            AllowEntry::parse(" Hooks.Internal. ").unwrap(),
            AllowEntry::Host("hooks.internal".into())
        );
        for (bad, problem) in [
            ("", "must not be empty"),
            ("10.0.0.0/33", "is not a network"),
            ("10.0.0/8", "is not a network"),
            ("hooks internal", "neither an IP address"),
            ("https://hooks.internal", "is not a network"),
            ("-x.example", "neither an IP address"),
            ("a..b", "neither an IP address"),
            ("höst", "neither an IP address"),
        ] {
            let e = AllowEntry::parse(bad).expect_err(bad);
            assert!(e.contains(problem), "{bad:?}: {e}");
        }
        let e = AllowList::parse(&["127.0.0.1", "bad entry"]).unwrap_err();
        assert!(e.contains("\"bad entry\""), "{e}");
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn public_addresses_pass_and_any_internal_one_refuses() {
        let none = AllowList::default();
        assert_eq!(
            none.vet("hooks.example.com", &ips(&["93.184.216.34"])),
            Ok(())
        );
        assert_eq!(
            none.vet("hooks.example.com", &ips(&["93.184.216.34", "10.0.0.5"])),
            Err(Refusal {
                address: "10.0.0.5".parse().unwrap(),
                class: AddressClass::Private
            })
        );
        assert_eq!(
            none.vet("127.0.0.1", &ips(&["127.0.0.1"]))
                .unwrap_err()
                .class,
            AddressClass::Loopback
        );
        assert_eq!(
            none.vet("x", &ips(&["::ffff:127.0.0.1"]))
                .unwrap_err()
                .class,
            AddressClass::Loopback
        );
    }

    #[test]
    fn the_allow_list_admits_hosts_addresses_and_networks() {
        let allow =
            AllowList::parse(&["127.0.0.1", "hooks.internal", "10.0.0.0/8", "fd00::/8"]).unwrap();
        assert_eq!(allow.vet("127.0.0.1", &ips(&["127.0.0.1"])), Ok(()));
        // The IPv4-mapped form of an allowed address is allowed too.
        assert_eq!(allow.vet("x.example", &ips(&["::ffff:127.0.0.1"])), Ok(()));
        assert_eq!(
            allow.vet("x.example", &ips(&["10.9.8.7", "8.8.8.8"])),
            Ok(())
        );
        assert_eq!(allow.vet("x.example", &ips(&["fd00::5"])), Ok(()));
        // A listed host may resolve to anything; the name is compared without case.
        assert_eq!(
            allow.vet("HOOKS.internal.", &ips(&["192.168.1.1", "::1"])),
            Ok(())
        );
        // Only what is listed: another loopback address, another private network.
        assert_eq!(
            allow
                .vet("x.example", &ips(&["127.0.0.2"]))
                .unwrap_err()
                .class,
            AddressClass::Loopback
        );
        assert_eq!(
            allow.vet("x.example", &ips(&["10.0.0.1", "192.168.0.1"])),
            Err(Refusal {
                address: "192.168.0.1".parse().unwrap(),
                class: AddressClass::Private
            })
        );
        assert_eq!(
            allow
                .vet("other.internal", &ips(&["::1"]))
                .unwrap_err()
                .class,
            AddressClass::Loopback
        );
    }
}
