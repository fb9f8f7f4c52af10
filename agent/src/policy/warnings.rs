//! Checks that report without refusing: rules the agent's DNS path makes
//! redundant.

use super::diagnostic::Diagnostic;
use super::model::Action;
use super::parse::FileContents;
use super::summary::{describe_ports, protocol_text};

/// The DNS port.
const DNS: u16 = 53;

/// A warning for every allow rule that lists ports covering 53: the
/// agent's DNS path takes every workload's queries to its own resolver,
/// whatever server they name, so such a rule no longer decides them.
/// Rules without `ports` (every port) are left alone: they are not about
/// DNS. Made for one file's contents (warnings are about a rule alone),
/// so a reader keeps the warnings of the files it does not parse again.
pub fn check(contents: &FileContents) -> Vec<Diagnostic> {
    (contents.unknown.iter().map(|(p, _)| p))
        .chain(contents.identities.iter().map(|b| &b.policy))
        .flat_map(|p| &p.egress)
        .filter(|rule| {
            rule.action == Action::Allow
                && rule.ports.iter().any(|p| (p.first..=p.last).contains(&DNS))
        })
        .map(|rule| {
            Diagnostic::warning_at(
                &rule.at,
                format!(
                    "rule {:?} allows {} {} (DNS), which the agent's DNS path handles for every workload: queries go to its resolver whatever server they name, so this rule is redundant for them (it still decides while [dns] is off, and for identities in [dns] direct); name the hosts the workload reaches in `to` instead",
                    rule.name,
                    protocol_text(rule.protocol),
                    describe_ports(&rule.port_ranges()),
                ),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use crate::policy::Severity;
    use crate::policy::testing::policy;

    #[test]
    fn allow_rules_listing_port_53_are_redundant() {
        let p = policy(
            r#"
            [[unknown.egress]]
            name = "dns"
            to = ["127.0.0.53"]
            ports = [53]
            protocol = "udp"
            action = "allow"
            [[identity]]
            id = "spiffe://example.org/web"
            [[identity.egress]]
            name = "low"
            to = ["10.0.0.0/8"]
            ports = ["1-1024"]
            action = "allow"
            [[identity.egress]]
            name = "everything"
            to = ["any"]
            action = "allow"
            [[identity.egress]]
            name = "no-dns"
            to = ["192.0.2.53"]
            ports = [53]
            action = "deny"
            [[identity.egress]]
            name = "https"
            to = ["api.example.com"]
            ports = [443]
            action = "allow"
            "#,
        );
        let got: Vec<(u32, String)> = p
            .warnings
            .iter()
            .map(|w| {
                assert_eq!(w.severity, Severity::Warning);
                (w.position.unwrap().0, w.to_string())
            })
            .collect();
        assert_eq!(got.len(), 2, "{got:#?}");
        assert_eq!(got[0].0, 2);
        assert!(
            got[0].1.ends_with(
                "p.toml:2:13: warning: rule \"dns\" allows udp port 53 (DNS), which the agent's DNS path handles for every workload: queries go to its resolver whatever server they name, so this rule is redundant for them (it still decides while [dns] is off, and for identities in [dns] direct); name the hosts the workload reaches in `to` instead"
            ),
            "{}",
            got[0].1
        );
        assert_eq!(got[1].0, 10);
        assert!(
            got[1]
                .1
                .contains("rule \"low\" allows tcp+udp ports 1-1024 (DNS)")
        );
    }
}
