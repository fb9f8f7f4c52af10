//! A policy in words: for `idgate policy check` and `idgate policy show`.

use std::fmt::Write;

use super::model::{
    CredentialKind, CredentialRule, Destination, EgressRule, Keyword, Mode, OAuthClient,
    OAuthGrant, PolicySet, Protocol,
};
use super::precedence::{Blocks, UNKNOWN_BLOCK};

/// `tcp`, `udp` or `tcp+udp`.
pub fn protocol_text(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Any => "tcp+udp",
        p => p.word(),
    }
}

/// `all ports`, `port 443` or `ports 443,8000-8080`.
pub fn describe_ports(ranges: &[(u16, u16)]) -> String {
    if ranges == [(0, u16::MAX)] {
        return "all ports".into();
    }
    let list: Vec<String> = ranges
        .iter()
        .map(|&(first, last)| {
            if first == last {
                first.to_string()
            } else {
                format!("{first}-{last}")
            }
        })
        .collect();
    let noun = if list.len() == 1 && !list[0].contains('-') {
        "port"
    } else {
        "ports"
    };
    format!("{noun} {}", list.join(","))
}

/// One rule in one line, e.g. `allow tcp to 10.0.0.0/8, ::1/128 port 443`.
/// Two rules with the same line match the same connects the same way.
pub fn describe_rule(rule: &EgressRule) -> String {
    let to: Vec<String> = rule
        .to
        .iter()
        .map(|d| match d {
            Destination::Any => "any".to_owned(),
            Destination::Net(n) => n.to_string(),
            Destination::Name(n) => n.to_string(),
        })
        .collect();
    format!(
        "{} {} to {} {}",
        rule.action.word(),
        protocol_text(rule.protocol),
        to.join(", "),
        describe_ports(&rule.port_ranges())
    )
}

/// One credential rule in one line, e.g. `broker tcp to api.x.com port
/// 443: header x-api-key from /etc/idgate/secrets/x`. Two rules with the
/// same line do the same.
pub fn describe_credential(rule: &CredentialRule) -> String {
    let adds = match &rule.kind {
        CredentialKind::Header {
            header,
            secret_file,
            prefix,
        } => {
            let prefix = if prefix.is_empty() {
                String::new()
            } else {
                format!(" after {prefix:?}")
            };
            format!("header {header} from {}{prefix}", secret_file.display())
        }
        CredentialKind::JwtSvid { audience } => {
            format!("authorization: Bearer JWT-SVID for {}", audience.join(", "))
        }
        CredentialKind::OAuth(client) => describe_oauth(client),
    };
    let mut out = format!(
        "broker tcp to {} {}: {adds}",
        rule.host,
        describe_ports(&rule.ports())
    );
    if !rule.methods.is_empty() {
        let _ = write!(out, "; methods {}", rule.methods.join(","));
    }
    if !rule.paths.is_empty() {
        let _ = write!(out, "; paths {}", rule.paths.join(","));
    }
    out
}

/// What an `oauth` credential rule adds, e.g. `authorization: Bearer
/// token from https://sts.x.com/token (token exchange of a JWT-SVID for
/// sts.x.com; scope "read")`.
fn describe_oauth(client: &OAuthClient) -> String {
    let audience = client.audience.join(", ");
    let grant = match client.grant {
        OAuthGrant::TokenExchange => format!("token exchange of a JWT-SVID for {audience}"),
        OAuthGrant::ClientCredentials => {
            format!("client credentials, a JWT-SVID for {audience} as client assertion")
        }
    };
    let mut out = format!(
        "authorization: Bearer token from {} ({grant}",
        client.token_endpoint
    );
    for (name, value) in [
        ("scope", &client.scope),
        ("resource", &client.resource),
        ("token audience", &client.token_audience),
        ("client id", &client.client_id),
    ] {
        if let Some(v) = value {
            let _ = write!(out, "; {name} {v:?}");
        }
    }
    out.push(')');
    out
}

/// The whole policy: the mode, then one paragraph per block (the unknown
/// workload first) with the settings its identities get and its rules.
pub fn summary(policy: &PolicySet) -> String {
    let mut out = String::new();
    let mode = match policy.mode {
        Mode::Enforce => "enforce",
        Mode::Audit => "audit (denials are reported, not enforced)",
    };
    let _ = writeln!(out, "mode: {mode}");
    let blocks = Blocks::new(policy);
    for b in 0..blocks.len() {
        let block = blocks.get(b);
        let context = blocks.context(b);
        let settings = blocks.settings(&context);
        let who = if b == UNKNOWN_BLOCK {
            "unknown workloads".to_owned()
        } else {
            block.owner()
        };
        let audit = if settings.audit {
            "audit only"
        } else {
            "enforced"
        };
        let _ = write!(out, "{who}: default {}, {audit}", settings.default.word());
        if settings.raw_sockets {
            out.push_str(", raw sockets allowed (no egress rule judges them)");
        }
        let also: Vec<String> = context[..context.len() - 1]
            .iter()
            .map(|&o| blocks.get(o).owner())
            .collect();
        if !also.is_empty() {
            let _ = write!(out, "; also the rules of {}", also.join(", "));
        }
        out.push('\n');
        let policy = block.policy;
        if policy.egress.is_empty() && policy.credentials.is_empty() {
            let _ = writeln!(out, "  (no rules)");
        }
        for rule in &policy.egress {
            let _ = writeln!(out, "  {}  [{}]", describe_rule(rule), rule.name);
        }
        for rule in &policy.credentials {
            let _ = writeln!(out, "  {}  [{}]", describe_credential(rule), rule.name);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testing::policy;

    #[test]
    fn says_what_each_block_allows_and_denies_and_what_it_inherits() {
        let p = policy(
            r#"
            mode = "audit"
            [[identity]]
            id = "spiffe://example.org/agents/*"
            raw_sockets = true
            [[identity.egress]]
            name = "llm-api"
            to = ["192.0.2.10", "2001:db8::10"]
            ports = [443]
            protocol = "tcp"
            action = "allow"
            [[identity]]
            id = "spiffe://example.org/agents/coder"
            default = "allow"
            audit = false
            [[identity.egress]]
            name = "git"
            to = ["198.51.100.0/24"]
            ports = [22, "9000-9010"]
            action = "allow"
            [[identity.egress]]
            name = "no-metadata"
            to = ["any"]
            protocol = "udp"
            action = "deny"
            [[identity.egress]]
            name = "docs"
            to = ["Docs.example.com.", "*.cdn.example.com", "192.0.2.7"]
            ports = [443]
            protocol = "tcp"
            action = "allow"
            "#,
        );
        assert_eq!(
            summary(&p),
            "mode: audit (denials are reported, not enforced)
unknown workloads: default deny, audit only
  (no rules)
spiffe://example.org/agents/*: default deny, audit only, raw sockets allowed (no egress rule judges them)
  allow tcp to 192.0.2.10/32, 2001:db8::10/128 port 443  [llm-api]
spiffe://example.org/agents/coder: default allow, enforced, raw sockets allowed (no egress rule judges them); also the rules of spiffe://example.org/agents/*
  allow tcp+udp to 198.51.100.0/24 ports 22,9000-9010  [git]
  deny udp to any all ports  [no-metadata]
  allow tcp to docs.example.com, *.cdn.example.com, 192.0.2.7/32 port 443  [docs]
"
        );
    }

    #[test]
    fn says_what_each_credential_rule_adds() {
        let secret = crate::policy::testing::secret_file().display().to_string();
        let p = policy(&format!(
            r#"
            [[identity]]
            id = "spiffe://example.org/agent"
            [[identity.credential]]
            name = "openai"
            host = "api.openai.com"
            header = "Authorization"
            secret_file = "{secret}"
            prefix = "Bearer "
            methods = ["post"]
            paths = ["/v1/chat/", "/v1/models"]
            [[identity.credential]]
            name = "internal"
            host = "internal.example.com"
            kind = "jwt_svid"
            audience = ["internal", "x"]
            http = true
            [[identity.credential]]
            name = "saas"
            host = "saas.example.com"
            kind = "oauth"
            token_endpoint = "https://sts.example.com/token"
            audience = ["https://sts.example.com"]
            scope = "read"
            client_id = "idgate"
            [[identity.credential]]
            name = "saas2"
            host = "saas2.example.com"
            kind = "oauth"
            token_endpoint = "https://sts.example.com/token"
            grant = "client_credentials"
            audience = ["sts"]
            resource = "https://saas2.example.com/"
            token_audience = "saas2"
            "#
        ));
        let text = summary(&p);
        let lines: Vec<&str> = text.lines().skip(4).collect();
        assert_eq!(
            lines,
            [
                format!(
                    "  broker tcp to api.openai.com port 443: header authorization from {secret} after \"Bearer \"; methods POST; paths /v1/chat/,/v1/models  [openai]"
                ),
                "  broker tcp to internal.example.com ports 80,443: authorization: Bearer JWT-SVID for internal, x  [internal]".to_owned(),
                "  broker tcp to saas.example.com port 443: authorization: Bearer token from https://sts.example.com/token (token exchange of a JWT-SVID for https://sts.example.com; scope \"read\"; client id \"idgate\")  [saas]".to_owned(),
                "  broker tcp to saas2.example.com port 443: authorization: Bearer token from https://sts.example.com/token (client credentials, a JWT-SVID for sts as client assertion; resource \"https://saas2.example.com/\"; token audience \"saas2\")  [saas2]".to_owned(),
            ]
        );
    }
}
