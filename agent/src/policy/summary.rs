//! A policy in words: for `idgate policy check` and `idgate policy show`.

use std::fmt::Write;

use super::model::{Action, Destination, EgressRule, IdentityPolicy, Mode, PolicySet, Protocol};

/// One rule in one line, e.g. `allow tcp to 10.0.0.0/8, ::1/128 ports 443`.
/// Two rules with the same line match the same connects the same way.
pub fn describe_rule(rule: &EgressRule) -> String {
    let action = match rule.action {
        Action::Allow => "allow",
        Action::Deny => "deny",
    };
    let protocol = match rule.protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Any => "tcp+udp",
    };
    let to: Vec<String> = rule
        .to
        .iter()
        .map(|d| match d {
            Destination::Any => "any".to_owned(),
            Destination::Net(n) => n.to_string(),
        })
        .collect();
    let ports = if rule.ports.is_empty() {
        "all ports".to_owned()
    } else {
        let list: Vec<String> = rule
            .ports
            .iter()
            .map(|p| {
                if p.first == p.last {
                    p.first.to_string()
                } else {
                    format!("{}-{}", p.first, p.last)
                }
            })
            .collect();
        format!("ports {}", list.join(","))
    };
    format!("{action} {protocol} to {} {ports}", to.join(", "))
}

/// The whole policy, one identity per paragraph.
pub fn summary(policy: &PolicySet) -> String {
    let mut out = String::new();
    let mode = match policy.mode {
        Mode::Enforce => "enforce",
        Mode::Audit => "audit (denials are reported, not enforced)",
    };
    let _ = writeln!(out, "mode: {mode}");
    paragraph(&mut out, "unknown workloads", &policy.unknown);
    for (id, p) in &policy.identities {
        paragraph(&mut out, id.as_str(), p);
    }
    out
}

fn paragraph(out: &mut String, who: &str, p: &IdentityPolicy) {
    let default = match p.default {
        Action::Allow => "allow",
        Action::Deny => "deny",
    };
    let audit = match p.audit {
        Some(true) => ", audit",
        Some(false) => ", enforce",
        None => "",
    };
    let _ = writeln!(out, "{who}: default {default}{audit}");
    if p.egress.is_empty() {
        let _ = writeln!(out, "  (no rules)");
    }
    for rule in &p.egress {
        let _ = writeln!(out, "  {}  [{}]", describe_rule(rule), rule.name);
    }
}
