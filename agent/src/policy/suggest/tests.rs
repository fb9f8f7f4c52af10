use std::time::{Duration, SystemTime};

use super::*;
use crate::policy::testing::{PolicyDir, policy};
use crate::policy::{Action, Destination, Protocol};

const WEB: &str = "spiffe://example.org/web";
const DB: &str = "spiffe://example.org/db";

/// An audit-allowed TCP connect of `web` to `addr:port`, `sec` seconds
/// into the day.
fn event(addr: &str, port: u16, sec: u64) -> Event {
    let line = format!(
        r#"{{"version":1,"time":"2026-11-23T08:00:{sec:02}.000000000Z","ktime_ns":1,"verdict":"allow","reason":"audit_allowed","identity":"{WEB}","slot":2,"generation":0,"rule_id":0,"rule":"default","hook":"connect4","protocol":"tcp","dst_addr":"{addr}","dst_port":{port},"v4_mapped":false,"pid":1,"tid":1,"uid":0,"gid":0,"comm":"x","exe":null,"exe_unknown":"exited","cgroup_id":9}}"#
    );
    serde_json::from_str(&line).unwrap()
}

fn suggest(options: SuggestOptions, events: &[Event]) -> String {
    let mut s = Suggester::new(options);
    for e in events {
        s.add(e).unwrap();
    }
    s.render()
}

/// The text loads as a policy with no warnings; its rules of `id`.
fn rules(text: &str, id: &str) -> Vec<crate::policy::EgressRule> {
    let set = policy(text);
    assert!(set.warnings.is_empty(), "{:?}", set.warnings);
    let block = set
        .identities
        .iter()
        .find(|b| b.subject.to_string() == id)
        .unwrap_or_else(|| panic!("no block for {id} in\n{text}"));
    assert_eq!(block.policy.default, Some(Action::Deny));
    block.policy.egress.clone()
}

fn to(rule: &crate::policy::EgressRule) -> Vec<String> {
    rule.to
        .iter()
        .map(|d| match d {
            Destination::Net(n) => n.to_string(),
            Destination::Name(n) => n.to_string(),
            Destination::Any => "any".into(),
        })
        .collect()
}

#[test]
fn exact_addresses_by_default_grouped_by_ports_and_protocol() {
    let mut udp = event("10.0.0.3", 5353, 3);
    udp.protocol = "udp".into();
    udp.hook = "sendmsg4".into();
    let mut mptcp = event("10.0.0.4", 443, 4);
    mptcp.protocol = "mptcp".into();
    let text = suggest(
        SuggestOptions::default(),
        &[
            event("10.0.0.2", 443, 2),
            event("10.0.0.1", 443, 1),
            event("10.0.0.1", 443, 5),
            event("10.0.0.9", 8000, 6),
            event("10.0.0.9", 8001, 6),
            event("10.0.0.9", 9000, 7),
            udp,
            mptcp,
        ],
    );
    let rules = rules(&text, WEB);
    let got: Vec<_> = rules
        .iter()
        .map(|r| (r.name.as_str(), to(r), r.port_ranges(), r.protocol))
        .collect();
    assert_eq!(
        got,
        [
            (
                "tcp-443",
                vec![
                    "10.0.0.1/32".into(),
                    "10.0.0.2/32".into(),
                    "10.0.0.4/32".into()
                ],
                vec![(443, 443)],
                Protocol::Tcp
            ),
            (
                "tcp-8000-8001_9000",
                vec!["10.0.0.9/32".into()],
                vec![(8000, 8001), (9000, 9000)],
                Protocol::Tcp
            ),
            (
                "udp-5353",
                vec!["10.0.0.3/32".into()],
                vec![(5353, 5353)],
                Protocol::Udp
            ),
        ]
    );
    assert!(text.contains("to = [\"10.0.0.1\", \"10.0.0.2\", \"10.0.0.4\"]"));
    assert!(text.contains(
        "# 4 connects, first 2026-11-23T08:00:01Z, last 2026-11-23T08:00:05Z:\n\
         #   10.0.0.1: 2 connects, 2026-11-23T08:00:01Z to 2026-11-23T08:00:05Z\n"
    ));
}

#[test]
fn merges_into_prefixes_only_as_far_as_asked() {
    let events = [
        event("10.0.0.1", 443, 1),
        event("10.0.0.2", 443, 1),
        event("10.0.1.7", 443, 1),
        event("2001:db8::1", 443, 1),
        event("2001:db8::ff", 443, 1),
    ];
    let exact = suggest(SuggestOptions::default(), &events);
    assert_eq!(to(&rules(&exact, WEB)[0]).len(), 5);
    let merged = suggest(
        SuggestOptions {
            prefix_v4: 24,
            prefix_v6: 64,
            ..Default::default()
        },
        &events,
    );
    // The shortest prefix holding each /24's addresses, never wider.
    assert_eq!(
        to(&rules(&merged, WEB)[0]),
        ["10.0.0.0/30", "10.0.1.7/32", "2001:db8::/120"]
    );
    assert!(merged.contains("#   10.0.0.0/30 (2 addresses): 2 connects"));
    let wide = suggest(
        SuggestOptions {
            prefix_v4: 16,
            ..Default::default()
        },
        &events,
    );
    assert_eq!(to(&rules(&wide, WEB)[0])[0], "10.0.0.0/23");
}

#[test]
fn a_name_stands_for_the_address_learned_through_it() {
    let mut named = event("192.0.2.10", 443, 1);
    named.dst_name = Some("API.example.com".into());
    let mut mapped = event("::ffff:192.0.2.11", 443, 2);
    mapped.v4_mapped = true;
    mapped.hook = "connect6".into();
    let text = suggest(SuggestOptions::default(), &[named, mapped]);
    assert_eq!(
        to(&rules(&text, WEB)[0]),
        ["192.0.2.11/32", "api.example.com"]
    );
    assert!(!text.contains("192.0.2.10"));
}

#[test]
fn takes_only_what_an_allow_rule_would_change() {
    let mut denied = event("10.0.0.1", 80, 1);
    (denied.verdict, denied.reason) = (Verdict::Deny, "default".into());
    let mut by_rule = event("10.0.0.2", 80, 1);
    (by_rule.verdict, by_rule.reason) = (Verdict::Deny, "rule".into());
    let mut allowed = event("10.0.0.3", 80, 1);
    allowed.reason = "rule".into();
    let mut dns = event("127.0.0.53", 53, 1);
    dns.hook = "dns".into();
    let mut revoked = event("10.0.0.4", 80, 1);
    (revoked.verdict, revoked.reason) = (Verdict::Deny, "revoked".into());
    let mut other = event("10.0.0.5", 80, 1);
    other.identity = Some(DB.into());
    let text = suggest(
        SuggestOptions {
            identity: Some(WEB.parse().unwrap()),
            ..Default::default()
        },
        &[denied, by_rule, allowed, dns, revoked, other],
    );
    let rules = rules(&text, WEB);
    assert_eq!(rules.len(), 1);
    assert_eq!(to(&rules[0]), ["10.0.0.1/32"]);
    assert!(!text.contains(DB));
    assert!(text.starts_with("# Suggested by `idgate policy suggest` from 5 decision records,"));
}

#[test]
fn unknown_workloads_are_a_comment_never_a_rule() {
    let mut unknown = event("10.0.0.1", 443, 1);
    (unknown.verdict, unknown.reason) = (Verdict::Deny, "unknown_workload".into());
    (unknown.identity, unknown.slot) = (None, 0);
    unknown.dst_name = Some("api.example.com".into());
    let mut unnamed = event("10.0.0.2", 443, 1);
    (unnamed.identity, unnamed.slot) = (None, 7);
    let mut sctp = event("10.0.0.3", 443, 1);
    sctp.protocol = "132".into();
    let text = suggest(SuggestOptions::default(), &[unknown, unnamed, sctp]);
    let set = policy(&text);
    assert!(set.unknown.egress.is_empty());
    assert!(set.identities.is_empty(), "{text}");
    assert!(text.contains(
        "# No rule for unknown workloads (no identity): an identity's connects only. Seen:\n\
         #   tcp 10.0.0.1 port 443: 1 connect"
    ));
    assert!(text.contains("# No rule for slot 7"));
    assert!(text.contains(&format!(
        "# {WEB}:\n# no rule can allow 1 connect over IP protocol 132\n"
    )));
    assert!(text.contains("# No connect of an identity to suggest a rule for."));
}

#[test]
fn since_leaves_out_earlier_records_and_missed_ones_are_said() {
    let since = humantime::parse_rfc3339("2026-11-23T08:00:05Z").unwrap();
    let mut s = Suggester::new(SuggestOptions {
        since: Some(since),
        ..Default::default()
    });
    s.add(&event("10.0.0.1", 443, 4)).unwrap();
    s.add(&event("10.0.0.2", 443, 5)).unwrap();
    s.missed(3);
    let text = s.render();
    assert_eq!(to(&rules(&text, WEB)[0]), ["10.0.0.2/32"]);
    assert!(text.contains("# INCOMPLETE: 3 decision records were lost"));
    let mut bad = event("10.0.0.1", 443, 4);
    bad.time = "yesterday".into();
    assert!(
        s.add(&bad)
            .unwrap_err()
            .to_string()
            .contains("\"yesterday\"")
    );
}

#[test]
fn the_same_records_in_any_order_give_the_same_text() {
    let mut events: Vec<Event> = (0..40)
        .map(|i| {
            event(
                &format!("10.0.{}.{}", i % 3, i % 7),
                400 + (i % 5) as u16,
                i % 60,
            )
        })
        .collect();
    for (i, e) in events.iter_mut().enumerate() {
        if i % 4 == 0 {
            e.identity = Some(DB.into());
        }
        if i % 3 == 0 {
            e.protocol = "udp".into();
        }
    }
    let first = suggest(SuggestOptions::default(), &events);
    events.reverse();
    events.rotate_left(13);
    assert_eq!(suggest(SuggestOptions::default(), &events), first);
    // And it checks clean: both blocks, no conflict, nothing that never matches.
    assert!(!rules(&first, WEB).is_empty());
    assert!(!rules(&first, DB).is_empty());
}

#[test]
fn since_takes_a_time_or_a_duration_back() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(10_000);
    assert_eq!(
        parse_since("1h", now).unwrap(),
        now - Duration::from_secs(3600)
    );
    assert_eq!(
        parse_since("1970-01-01T00:00:10Z", now).unwrap(),
        SystemTime::UNIX_EPOCH + Duration::from_secs(10)
    );
    let e = parse_since("soon", now).unwrap_err().to_string();
    assert!(e.contains("\"soon\" is neither an RFC 3339 time"), "{e}");
}

#[test]
fn reads_rotated_logs_oldest_first_and_skips_bad_lines() {
    let line = |addr: &str, sec| serde_json::to_string(&event(addr, 443, sec)).unwrap();
    let grant = r#"{"version":1,"time":"2026-11-23T08:32:01.011532004Z","kind":"grant","action":"granted","grant_id":12,"identity":"spiffe://example.org/web","to":"10.20.0.0/16","ports":"443","protocol":"tcp","uid":1000,"granted_by":1000,"reason":null,"expiry_boot_ns":5}"#;
    let lost = r#"{"version":1,"time":"2026-11-23T08:00:05.000000000Z","kind":"lost","source":"ring_buffer","records":7}"#;
    let dir = PolicyDir::new(&[
        ("audit.log.2", &format!("{}\n", line("10.0.0.1", 1))),
        (
            "audit.log.1",
            &format!("{grant}\n{{\"version\":1\n{lost}\n"),
        ),
        ("audit.log", &format!("{}\n", line("10.0.0.2", 9))),
    ]);
    let mut s = Suggester::new(SuggestOptions::default());
    let warnings = read_audit_log(&dir.file("audit.log"), &mut s).unwrap();
    assert_eq!(warnings.len(), 1);
    let want = format!(
        "{}:2: skipped, not a decision record:",
        dir.file("audit.log.1").display()
    );
    assert!(warnings[0].starts_with(&want), "{warnings:?}");
    let text = s.render();
    assert_eq!(to(&rules(&text, WEB)[0]), ["10.0.0.1/32", "10.0.0.2/32"]);
    assert!(text.contains("2026-11-23T08:00:01Z to 2026-11-23T08:00:09Z"));
    assert_eq!(s.missed_records(), 7);
    // Lost before the window: not counted.
    let mut s = Suggester::new(SuggestOptions {
        since: Some(humantime::parse_rfc3339("2026-11-23T08:00:06Z").unwrap()),
        ..Default::default()
    });
    read_audit_log(&dir.file("audit.log"), &mut s).unwrap();
    assert_eq!(s.missed_records(), 0);
    assert_eq!(to(&rules(&s.render(), WEB)[0]), ["10.0.0.2/32"]);

    let e = read_audit_log(&dir.file("nothing.log"), &mut s).unwrap_err();
    assert!(
        e.to_string().contains("nothing.log: no such audit log"),
        "{e}"
    );
}

/// `who`'s audit-mode lookup of `name`, `sec` seconds into the day,
/// forwarded as it is with `answered` (address, TTL) in its record.
fn lookup(who: &str, name: &str, answered: &[(&str, u32)], sec: u64) -> Event {
    let answered: Vec<String> = answered
        .iter()
        .map(|(a, ttl)| format!(r#"{{"addr":"{a}","ttl":{ttl}}}"#))
        .collect();
    let line = format!(
        r#"{{"version":1,"time":"2026-11-23T08:00:{sec:02}.000000000Z","ktime_ns":1,"verdict":"allow","reason":"audit_allowed","identity":"{who}","slot":2,"generation":0,"rule_id":0,"rule":null,"hook":"dns","protocol":"udp","dst_addr":"127.53.0.2","dst_port":53,"v4_mapped":false,"pid":0,"tid":0,"uid":0,"gid":0,"comm":"","exe":null,"exe_unknown":null,"cgroup_id":0,"dst_name":"{name}","dns":{{"qtype":"A","learned":[],"dropped":[],"answered":[{}]}}}}"#,
        answered.join(",")
    );
    serde_json::from_str(&line).unwrap()
}

#[test]
fn a_name_from_an_audit_lookup_stands_for_the_address_it_answered() {
    let mut mapped = event("::ffff:192.0.2.10", 443, 3);
    mapped.v4_mapped = true;
    mapped.hook = "connect6".into();
    let mut udp = event("192.0.2.10", 8443, 4);
    udp.protocol = "udp".into();
    let text = suggest(
        SuggestOptions::default(),
        &[
            // Log order is not time order: the lookup comes later in it.
            event("192.0.2.10", 443, 2),
            lookup(
                WEB,
                "API.example.com",
                &[("192.0.2.10", 300), ("192.0.2.11", 300)],
                1,
            ),
            mapped,
            udp,
            // Past the TTL (10 s) and the margin (5 s): the address.
            event("192.0.2.12", 443, 30),
            lookup(WEB, "short.example.com", &[("192.0.2.12", 10)], 10),
        ],
    );
    let rules = rules(&text, WEB);
    let got: Vec<_> = rules.iter().map(|r| (r.name.as_str(), to(r))).collect();
    assert_eq!(
        got,
        [
            (
                "tcp-443",
                vec!["192.0.2.12/32".to_owned(), "api.example.com".into()]
            ),
            ("udp-8443", vec!["api.example.com".into()]),
        ],
        "{text}"
    );
    assert!(
        text.contains(
            "#   api.example.com: 2 connects, 2026-11-23T08:00:02Z to 2026-11-23T08:00:03Z\n\
             #     for 192.0.2.10, which its lookup answered\n"
        ),
        "{text}"
    );
    assert!(!text.contains("192.0.2.11"), "{text}");
    assert!(!text.contains("short.example.com"), "{text}");
}

#[test]
fn an_address_answered_for_two_names_takes_the_last_lookup_s() {
    let events = [
        lookup(WEB, "a.example.com", &[("198.51.100.7", 300)], 1),
        event("198.51.100.7", 443, 2),
        lookup(WEB, "b.example.com", &[("198.51.100.7", 300)], 3),
        event("198.51.100.7", 443, 4),
        event("198.51.100.7", 443, 5),
    ];
    let text = suggest(SuggestOptions::default(), &events);
    assert_eq!(
        to(&rules(&text, WEB)[0]),
        ["a.example.com", "b.example.com"],
        "{text}"
    );
    assert!(
        text.contains(
            "#   b.example.com: 2 connects, 2026-11-23T08:00:04Z to 2026-11-23T08:00:05Z\n\
             #     for 198.51.100.7, which its lookup answered (and lookups of a.example.com: \
             the name of the last lookup before each connect is used)\n"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "#   a.example.com: 1 connect, 2026-11-23T08:00:02Z to 2026-11-23T08:00:02Z\n\
             #     for 198.51.100.7, which its lookup answered\n"
        ),
        "{text}"
    );
    // Two lookups at the same time: the first name in order, every time.
    let tie = [
        lookup(WEB, "z.example.com", &[("198.51.100.7", 300)], 1),
        lookup(WEB, "m.example.com", &[("198.51.100.7", 300)], 1),
        event("198.51.100.7", 443, 2),
    ];
    let text = suggest(SuggestOptions::default(), &tie);
    assert_eq!(to(&rules(&text, WEB)[0]), ["m.example.com"], "{text}");
    let mut reversed = tie.clone();
    reversed.reverse();
    assert_eq!(suggest(SuggestOptions::default(), &reversed), text);
}

#[test]
fn a_connect_before_any_lookup_stays_an_address() {
    let text = suggest(
        SuggestOptions::default(),
        &[
            event("203.0.113.9", 443, 1),
            lookup(WEB, "late.example.com", &[("203.0.113.9", 300)], 2),
            event("203.0.113.9", 443, 3),
        ],
    );
    assert_eq!(
        to(&rules(&text, WEB)[0]),
        ["203.0.113.9/32", "late.example.com"],
        "{text}"
    );
    assert!(
        text.contains("#   203.0.113.9: 1 connect, 2026-11-23T08:00:01Z to 2026-11-23T08:00:01Z\n"),
        "{text}"
    );
}

#[test]
fn another_identity_s_lookup_names_nothing() {
    let mut private = lookup(WEB, "inside.example.com", &[], 1);
    private.dns.as_mut().unwrap().answered = vec![crate::events::AnsweredAddress {
        addr: "10.1.2.3".parse().unwrap(),
        ttl: 300,
        would_drop: Some("private".into()),
    }];
    let mut learned = lookup(WEB, "rule.example.com", &[], 1);
    learned.reason = "answered".into();
    learned.dns.as_mut().unwrap().learned = vec!["192.0.2.40 ttl=60".into()];
    let mut denied = lookup(WEB, "refused.example.com", &[("192.0.2.50", 300)], 1);
    (denied.verdict, denied.reason) = (Verdict::Deny, "name_not_in_policy".into());
    let text = suggest(
        SuggestOptions::default(),
        &[
            lookup(DB, "db-only.example.com", &[("192.0.2.30", 300)], 1),
            event("192.0.2.30", 443, 2),
            // A name a rule of this agent would drop the address of stays
            // an address; a name rule's learned one is a name.
            private,
            event("10.1.2.3", 443, 2),
            learned,
            event("192.0.2.40", 443, 2),
            denied,
            event("192.0.2.50", 443, 2),
        ],
    );
    assert_eq!(
        to(&rules(&text, WEB)[0]),
        [
            "10.1.2.3/32",
            "192.0.2.30/32",
            "192.0.2.50/32",
            "rule.example.com"
        ],
        "{text}"
    );
    assert!(!text.contains("db-only"), "{text}");
    // With --identity, the other identity's records are not even read.
    let text = suggest(
        SuggestOptions {
            identity: Some(DB.parse().unwrap()),
            ..Default::default()
        },
        &[
            lookup(WEB, "web-only.example.com", &[("192.0.2.30", 300)], 1),
            {
                let mut e = event("192.0.2.30", 443, 2);
                e.identity = Some(DB.into());
                e
            },
        ],
    );
    assert_eq!(to(&rules(&text, DB)[0]), ["192.0.2.30/32"], "{text}");
}
