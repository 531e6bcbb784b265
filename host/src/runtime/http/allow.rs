//! The manifest's `allowed_hosts`: which scheme, host and port
//! combinations a handler may call.
//!
//! An entry is `scheme://host[:port]`: the scheme (`http` or `https`) is
//! required; no port means the scheme's default; the host is a DNS name,
//! an IPv4 literal, a bracketed IPv6 literal, or `*.` followed by a name of
//! at least two labels, which stands for any name ending in `.<name>`
//! (`*.crm.example.com` matches `eu.crm.example.com` and
//! `a.b.crm.example.com`, not `crm.example.com` itself). Nothing else: no
//! path, no user, no bare `*`.

use std::fmt;
use std::net::IpAddr;

/// `http` or `https`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP.
    Http,
    /// HTTP over TLS.
    Https,
}

impl Scheme {
    /// `http` or `https` (any case).
    pub fn parse(text: &str) -> Option<Scheme> {
        if text.eq_ignore_ascii_case("http") {
            Some(Scheme::Http)
        } else if text.eq_ignore_ascii_case("https") {
            Some(Scheme::Https)
        } else {
            None
        }
    }

    /// 80 or 443.
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// Which hosts an entry names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    /// One name, lowercase.
    Name(String),
    /// Every name ending in this suffix (which starts with `.`), lowercase.
    Suffix(String),
    /// One address.
    Ip(IpAddr),
}

/// One parsed `allowed_hosts` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHost {
    scheme: Scheme,
    host: HostPattern,
    port: u16,
    text: String,
}

impl fmt::Display for AllowedHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A request's destination: scheme, host (a name or an address) and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// The scheme.
    pub scheme: Scheme,
    /// The host as the request names it, lowercase, IPv6 without brackets.
    pub host: String,
    /// The port (the scheme's default when the request gives none).
    pub port: u16,
}

impl Destination {
    /// The address when the host is an IP literal.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }

    /// The `allowed_hosts` entry that would allow exactly this
    /// destination, e.g. `"https://erp.example.com"` or
    /// `"http://127.0.0.1:8090"`.
    pub fn entry(&self) -> String {
        let host = match self.ip() {
            Some(IpAddr::V6(ip)) => format!("[{ip}]"),
            _ => self.host.clone(),
        };
        if self.port == self.scheme.default_port() {
            format!("{}://{host}", self.scheme.as_str())
        } else {
            format!("{}://{host}:{}", self.scheme.as_str(), self.port)
        }
    }
}

/// An `allowed_hosts` entry that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("allowed_hosts[{index}] {entry:?}: {reason}")]
pub struct BadEntry {
    /// Its position in the list.
    pub index: usize,
    /// The entry as written.
    pub entry: String,
    /// What is wrong with it.
    pub reason: String,
}

/// A parsed `allowed_hosts` list. Empty: no outgoing HTTP at all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedHosts(Vec<AllowedHost>);

impl AllowedHosts {
    /// Parses every entry; the error names the first bad one.
    pub fn parse(entries: &[String]) -> Result<AllowedHosts, BadEntry> {
        entries
            .iter()
            .enumerate()
            .map(|(index, entry)| {
                parse_entry(entry).map_err(|reason| BadEntry {
                    index,
                    entry: entry.clone(),
                    reason,
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(AllowedHosts)
    }

    /// Whether no host is allowed.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The entry that allows `to`, if one does.
    pub fn allowing(&self, to: &Destination) -> Option<&AllowedHost> {
        let ip = to.ip();
        self.0.iter().find(|entry| {
            entry.scheme == to.scheme
                && entry.port == to.port
                && match (&entry.host, ip) {
                    (HostPattern::Ip(allowed), Some(ip)) => *allowed == ip,
                    (HostPattern::Name(name), None) => *name == to.host,
                    (HostPattern::Suffix(suffix), None) => {
                        to.host.len() > suffix.len() && to.host.ends_with(suffix.as_str())
                    }
                    _ => false,
                }
        })
    }

    /// Whether an entry names the address `ip` itself (whatever its
    /// scheme and port): what lets a name resolve to a link-local address.
    pub fn lists_ip(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0
            .iter()
            .any(|entry| matches!(entry.host, HostPattern::Ip(listed) if canonical(listed) == ip))
    }
}

/// Whether `ip` is link-local — 169.254.0.0/16 (where cloud metadata
/// services answer) or fe80::/10 — also when written IPv4-mapped.
pub fn is_link_local(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn parse_entry(text: &str) -> Result<AllowedHost, String> {
    let trimmed = text.trim();
    let Some((scheme, rest)) = trimmed.split_once("://") else {
        return Err(format!(
            "needs a scheme: write \"https://{trimmed}\" (or http://)"
        ));
    };
    let scheme = Scheme::parse(scheme)
        .ok_or_else(|| format!("the scheme must be http or https, not {scheme:?}"))?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#']) {
        return Err("names scheme, host and port only (no path or query)".into());
    }
    if authority.contains('@') {
        return Err("names scheme, host and port only (no user or password)".into());
    }
    let (host, port) = split_port(authority)?;
    let port = match port {
        Some(port) => port,
        None => scheme.default_port(),
    };
    let host = parse_host(host)?;
    Ok(AllowedHost {
        scheme,
        host,
        port,
        text: trimmed.to_string(),
    })
}

/// `host[:port]`, `[v6][:port]`.
fn split_port(authority: &str) -> Result<(&str, Option<u16>), String> {
    let parse_port = |port: &str| {
        port.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("the port must be 1 to 65535, not {port:?}"))
    };
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| "an IPv6 address needs its closing ]".to_string())?;
        return match after {
            "" => Ok((host, None)),
            _ => match after.strip_prefix(':') {
                Some(port) => Ok((host, Some(parse_port(port)?))),
                None => Err(format!("unexpected {after:?} after the IPv6 address")),
            },
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => Ok((host, Some(parse_port(port)?))),
        None => Ok((authority, None)),
    }
}

fn parse_host(host: &str) -> Result<HostPattern, String> {
    if host.is_empty() {
        return Err("has no host".into());
    }
    if host == "*" {
        return Err(
            "a bare * would allow every host; list the hosts (a wildcard is *.example.com)".into(),
        );
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(HostPattern::Ip(ip));
    }
    let lower = host.to_ascii_lowercase();
    if let Some(suffix) = lower.strip_prefix("*.") {
        valid_name(suffix)?;
        if !suffix.contains('.') {
            return Err(format!(
                "*.{suffix} is too broad: a wildcard needs a name of at least two labels (*.example.com)"
            ));
        }
        return Ok(HostPattern::Suffix(format!(".{suffix}")));
    }
    if lower.contains('*') {
        return Err("a wildcard may only be a leading *. (*.example.com)".into());
    }
    valid_name(&lower)?;
    Ok(HostPattern::Name(lower))
}

/// A DNS name: labels of letters, digits and hyphens, 1–63 bytes each,
/// not starting or ending with a hyphen; 253 bytes at most.
fn valid_name(name: &str) -> Result<(), String> {
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!("{name:?} is not a host name"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(entries: &[&str]) -> AllowedHosts {
        AllowedHosts::parse(&entries.iter().map(|e| e.to_string()).collect::<Vec<_>>())
            .expect("valid entries")
    }

    fn to(scheme: Scheme, host: &str, port: u16) -> Destination {
        Destination {
            scheme,
            host: host.into(),
            port,
        }
    }

    #[test]
    fn entries_allow_their_scheme_host_and_port_only() {
        let allowed = hosts(&[
            "https://erp.example.com",
            "http://127.0.0.1:8090",
            "https://*.crm.example.com:443",
            "http://[::1]:9000/",
            "HTTPS://Upper.Example.COM",
        ]);
        let yes = [
            to(Scheme::Https, "erp.example.com", 443),
            to(Scheme::Http, "127.0.0.1", 8090),
            to(Scheme::Https, "eu.crm.example.com", 443),
            to(Scheme::Https, "a.b.crm.example.com", 443),
            to(Scheme::Http, "::1", 9000),
            to(Scheme::Https, "upper.example.com", 443),
        ];
        for destination in &yes {
            assert!(allowed.allowing(destination).is_some(), "{destination:?}");
        }
        let no = [
            to(Scheme::Http, "erp.example.com", 80),
            to(Scheme::Https, "erp.example.com", 8443),
            to(Scheme::Https, "evil-erp.example.com", 443),
            to(Scheme::Https, "crm.example.com", 443),
            to(Scheme::Https, "xcrm.example.com", 443),
            to(Scheme::Http, "127.0.0.1", 8091),
            to(Scheme::Http, "127.0.0.2", 8090),
            to(Scheme::Http, "localhost", 8090),
        ];
        for destination in &no {
            assert!(allowed.allowing(destination).is_none(), "{destination:?}");
        }
        assert_eq!(
            allowed
                .allowing(&to(Scheme::Https, "eu.crm.example.com", 443))
                .map(ToString::to_string)
                .as_deref(),
            Some("https://*.crm.example.com:443"),
            "the entry that allowed it, as written"
        );
        assert!(AllowedHosts::default().is_empty());
    }

    #[test]
    fn bad_entries_are_named_with_what_is_wrong() {
        let cases = [
            (
                "erp.example.com",
                "needs a scheme: write \"https://erp.example.com\"",
            ),
            ("ftp://erp.example.com", "the scheme must be http or https"),
            ("https://erp.example.com/api", "no path or query"),
            ("https://user@erp.example.com", "no user or password"),
            ("https://erp.example.com:0", "the port must be 1 to 65535"),
            (
                "https://erp.example.com:http",
                "the port must be 1 to 65535",
            ),
            ("https://*", "a bare * would allow every host"),
            ("https://*.com", "too broad"),
            (
                "https://erp.*.example.com",
                "a wildcard may only be a leading *.",
            ),
            ("https://erp_1.example.com", "is not a host name"),
            ("https://[::1", "closing ]"),
            ("https://", "has no host"),
        ];
        for (entry, expected) in cases {
            let list = vec!["https://ok.example.com".to_string(), entry.to_string()];
            let error = AllowedHosts::parse(&list).expect_err(entry).to_string();
            assert!(
                error.starts_with(&format!("allowed_hosts[1] {entry:?}: "))
                    && error.contains(expected),
                "{error} ∌ {expected}"
            );
        }
    }

    #[test]
    fn the_entry_to_add_names_what_was_asked_for() {
        assert_eq!(
            to(Scheme::Https, "erp.example.com", 443).entry(),
            "https://erp.example.com"
        );
        assert_eq!(
            to(Scheme::Http, "127.0.0.1", 8090).entry(),
            "http://127.0.0.1:8090"
        );
        assert_eq!(to(Scheme::Http, "::1", 80).entry(), "http://[::1]");
        let entry = to(Scheme::Http, "10.0.0.1", 81).entry();
        assert!(
            hosts(&[&entry])
                .allowing(&to(Scheme::Http, "10.0.0.1", 81))
                .is_some()
        );
    }

    #[test]
    fn link_local_addresses_and_listed_ips() {
        for ip in [
            "169.254.169.254",
            "169.254.0.1",
            "fe80::1",
            "febf::1",
            "::ffff:169.254.169.254",
        ] {
            assert!(is_link_local(ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["127.0.0.1", "10.0.0.1", "::1", "fec0::1", "169.255.0.1"] {
            assert!(!is_link_local(ip.parse().expect("ip")), "{ip}");
        }
        let allowed = hosts(&["http://169.254.169.254", "https://metadata.internal"]);
        assert!(allowed.lists_ip("169.254.169.254".parse().expect("ip")));
        assert!(allowed.lists_ip("::ffff:169.254.169.254".parse().expect("ip")));
        assert!(!allowed.lists_ip("169.254.169.253".parse().expect("ip")));
    }
}
