//! `/etc/hosts` and `/etc/resolv.conf` for a networked task, from its attachments' results.

use super::Attachment;

/// `/etc/hosts`: loopback names, then the task's first address on each network under its
/// hostname (plus any `extra` "IP NAME..." lines, e.g. from `--add-host`).
pub fn hosts_file(hostname: &str, atts: &[Attachment], extra: &[String]) -> String {
    let mut s = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    let mut seen = Vec::new();
    for a in atts {
        if let Some(ip) = a.ips().into_iter().find(|ip| !ip.is_loopback()) {
            if !seen.contains(&ip) {
                s.push_str(&format!("{ip}\t{hostname}\n"));
                seen.push(ip);
            }
        }
    }
    for e in extra {
        s.push_str(e.trim());
        s.push('\n');
    }
    s
}

/// `/etc/resolv.conf`: the DNS settings the plugins returned, if any; otherwise the host's
/// file without loopback nameservers (a resolver on the host's 127.0.0.x is not reachable from
/// the task's namespace).
pub fn resolv_conf(atts: &[Attachment], host_resolv_conf: &str) -> String {
    let mut ns = Vec::new();
    let mut search = Vec::new();
    let mut options = Vec::new();
    for r in atts.iter().filter_map(|a| a.result.as_ref()) {
        for n in &r.dns.nameservers {
            if !ns.contains(n) {
                ns.push(n.clone());
            }
        }
        for d in r.dns.domain.iter().chain(r.dns.search.iter()) {
            if !search.contains(d) {
                search.push(d.clone());
            }
        }
        for o in &r.dns.options {
            if !options.contains(o) {
                options.push(o.clone());
            }
        }
    }
    if ns.is_empty() {
        return host_resolv_conf
            .lines()
            .filter(|l| {
                let mut w = l.split_whitespace();
                !(w.next() == Some("nameserver")
                    && w.next()
                        .and_then(|ip| ip.parse::<std::net::IpAddr>().ok())
                        .is_some_and(|ip| ip.is_loopback()))
            })
            .map(|l| format!("{l}\n"))
            .collect();
    }
    let mut s = String::new();
    if !search.is_empty() {
        s.push_str(&format!("search {}\n", search.join(" ")));
    }
    for n in ns {
        s.push_str(&format!("nameserver {n}\n"));
    }
    if !options.is_empty() {
        s.push_str(&format!("options {}\n", options.join(" ")));
    }
    s
}

/// `resolv` with its nameservers, search domains or options replaced by the user's
/// (`--dns`, `--dns-search`, `--dns-option`); an empty list keeps what was there.
pub fn override_resolv_conf(
    resolv: &str,
    nameservers: &[String],
    search: &[String],
    options: &[String],
) -> String {
    let key = |l: &str| l.split_whitespace().next().unwrap_or("").to_string();
    let mut out = String::new();
    if !search.is_empty() {
        out.push_str(&format!("search {}\n", search.join(" ")));
    }
    for n in nameservers {
        out.push_str(&format!("nameserver {n}\n"));
    }
    for l in resolv.lines() {
        let k = key(l);
        let replaced = (k == "nameserver" && !nameservers.is_empty())
            || ((k == "search" || k == "domain") && !search.is_empty())
            || (k == "options" && !options.is_empty());
        if !replaced {
            out.push_str(l);
            out.push('\n');
        }
    }
    if !options.is_empty() {
        out.push_str(&format!("options {}\n", options.join(" ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::{CniResult, Dns, Interface, IpConfig};

    fn att(ip: &str, dns: Dns) -> Attachment {
        Attachment {
            network: "n".into(),
            ifname: "eth0".into(),
            netns: "/x".into(),
            result: Some(CniResult {
                cni_version: "1.0.0".into(),
                interfaces: vec![Interface {
                    name: "eth0".into(),
                    mac: String::new(),
                    sandbox: "/x".into(),
                }],
                ips: vec![IpConfig {
                    version: None,
                    address: ip.parse().unwrap(),
                    gateway: None,
                    interface: Some(0),
                }],
                routes: vec![],
                dns,
            }),
        }
    }

    #[test]
    fn hosts_and_resolv_follow_the_results() {
        let a = att("10.232.0.5/24", Dns::default());
        let h = hosts_file("web", std::slice::from_ref(&a), &["10.0.0.9 db".into()]);
        assert!(
            h.contains("10.232.0.5\tweb\n") && h.ends_with("10.0.0.9 db\n"),
            "{h}"
        );
        let host = "search lan\nnameserver 127.0.0.53\nnameserver 192.0.2.1\noptions edns0\n";
        assert_eq!(
            resolv_conf(&[a], host),
            "search lan\nnameserver 192.0.2.1\noptions edns0\n"
        );
        let d = Dns {
            nameservers: vec!["10.232.0.1".into()],
            domain: Some("cluster".into()),
            search: vec!["svc".into()],
            options: vec!["ndots:2".into()],
        };
        assert_eq!(
            resolv_conf(&[att("10.232.0.6/24", d)], host),
            "search cluster svc\nnameserver 10.232.0.1\noptions ndots:2\n"
        );
    }

    #[test]
    fn user_dns_settings_replace_their_lines_only() {
        let base =
            "# generated\nsearch lan\nnameserver 192.0.2.1\noptions edns0\nsortlist 10.0.0.0\n";
        assert_eq!(override_resolv_conf(base, &[], &[], &[]), base);
        assert_eq!(
            override_resolv_conf(base, &["198.51.100.7".into()], &[], &["ndots:3".into()]),
            "nameserver 198.51.100.7\n# generated\nsearch lan\nsortlist 10.0.0.0\noptions ndots:3\n"
        );
        assert_eq!(
            override_resolv_conf(base, &[], &["a.test".into(), "b.test".into()], &[]),
            "search a.test b.test\n# generated\nnameserver 192.0.2.1\noptions edns0\nsortlist 10.0.0.0\n"
        );
    }
}
