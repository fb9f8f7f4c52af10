//! One policy file: from TOML (parsed with spans by the `toml` crate) to
//! the model, reporting every problem with its place instead of stopping
//! at the first. A rule or block with a problem is left out of the result.

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use ipnet::IpNet;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::diagnostic::{Diagnostic, Location, Source};
use super::model::{
    Action, CredentialKind, CredentialRule, Destination, EgressRule, IdentityBlock, IdentityPolicy,
    Keyword, Mode, OAuthClient, OAuthGrant, PortSpec, Protocol, Serial,
};
use super::names::NamePattern;
use super::ports::{self, PortError};
use super::subject::Subject;

/// What one file sets.
#[derive(Debug, Clone, Default)]
pub struct FileContents {
    pub mode: Option<(Mode, Location)>,
    /// `[unknown]`, and where its header is.
    pub unknown: Option<(IdentityPolicy, Location)>,
    pub identities: Vec<Arc<IdentityBlock>>,
}

/// Reads one file, adding every problem it finds to `diagnostics`. A file
/// that is not valid TOML yields its syntax errors and nothing else.
pub fn parse(source: &Source, diagnostics: &mut Vec<Diagnostic>) -> FileContents {
    let (root, syntax) = DeTable::parse_recoverable(&source.text);
    if !syntax.is_empty() {
        diagnostics.extend(syntax.iter().map(|e| {
            let span = e.span().unwrap_or(0..0);
            source.error(&span, format!("invalid TOML: {}", e.message()))
        }));
        return FileContents::default();
    }
    let mut reader = Reader {
        source,
        diagnostics,
    };
    reader.file(root.get_ref())
}

type Value<'i> = Spanned<DeValue<'i>>;

const TOP_KEYS: &[&str] = &["mode", "unknown", "identity"];
const UNKNOWN_KEYS: &[&str] = &["default", "audit", "egress"];
const IDENTITY_KEYS: &[&str] = &[
    "id",
    "default",
    "audit",
    "raw_sockets",
    "egress",
    "credential",
];
const RULE_KEYS: &[&str] = &["name", "to", "ports", "protocol", "action"];
const CREDENTIAL_KEYS: &[&str] = &[
    "name",
    "host",
    "kind",
    "header",
    "secret_file",
    "prefix",
    "audience",
    "token_endpoint",
    "grant",
    "scope",
    "resource",
    "token_audience",
    "client_id",
    "methods",
    "paths",
    "http",
];
/// The keys of credential rules of kind `header`.
const HEADER_KEYS: &[&str] = &["header", "secret_file", "prefix"];
/// The keys of credential rules of kind `jwt_svid`.
const JWT_SVID_KEYS: &[&str] = &["audience"];
/// The keys of credential rules of kind `oauth`.
const OAUTH_KEYS: &[&str] = &[
    "token_endpoint",
    "grant",
    "audience",
    "scope",
    "resource",
    "token_audience",
    "client_id",
];
/// Headers the broker itself sets or that frame the request: never a
/// credential's.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "connection",
    "content-length",
    "transfer-encoding",
    "upgrade",
    "te",
    "keep-alive",
    "proxy-connection",
];

const WANT_TO: &str = "`to` must be an array of CIDRs, addresses, DNS names or \"any\" (like to = [\"10.0.0.0/8\", \"api.example.com\"])";
const WANT_PORTS: &str =
    "`ports` must be an array of ports and ranges (like ports = [443, \"8000-8080\"])";

struct Reader<'a> {
    source: &'a Source,
    diagnostics: &'a mut Vec<Diagnostic>,
}

impl Reader<'_> {
    fn error(&mut self, span: &Range<usize>, message: impl Into<String>) {
        self.diagnostics.push(self.source.error(span, message));
    }

    fn file(&mut self, root: &DeTable) -> FileContents {
        self.known_keys(root, "a policy file", TOP_KEYS);
        let mut out = FileContents::default();
        if let Some(v) = root.get("mode") {
            out.mode = self
                .keyword("mode", v)
                .map(|m| (m, self.source.locate(v.span().start)));
        }
        if let Some(v) = root.get("unknown") {
            match v.get_ref() {
                DeValue::Table(t) => {
                    let policy = self.policy(t, Owner::Unknown, &mut HashMap::new());
                    out.unknown = Some((policy, self.source.locate(v.span().start)));
                }
                other => self.error(
                    &v.span(),
                    format!("`unknown` must be a table ([unknown]), not {}", a(other)),
                ),
            }
        }
        if let Some(v) = root.get("identity") {
            let want = "`identity` must be an array of tables ([[identity]])";
            for (block, t) in self.tables(v, want) {
                if let Some(b) = self.identity(block, t) {
                    out.identities.push(Arc::new(b));
                }
            }
        }
        out
    }

    /// One `[[identity]]` table.
    fn identity(&mut self, block: &Value, t: &DeTable) -> Option<IdentityBlock> {
        let mut names = HashMap::new();
        let mut policy = self.policy(t, Owner::Identity, &mut names);
        policy.raw_sockets = t
            .get("raw_sockets")
            .and_then(|v| self.boolean("raw_sockets", v));
        if let Some(credentials) = t.get("credential") {
            policy.credentials = self.credentials(credentials, &mut names);
        }
        let Some(id) = t.get("id") else {
            self.error(
                &block.span(),
                "this [[identity]] block has no `id` (a SPIFFE ID like \"spiffe://example.org/web\", or a pattern like \"spiffe://example.org/agents/*\")",
            );
            return None;
        };
        let text = self.string("`id`", id)?;
        match text.parse::<Subject>() {
            Ok(subject) => Some(IdentityBlock {
                subject,
                at: self.source.locate(id.span().start),
                policy,
                serial: Serial::next(),
            }),
            Err(e) => {
                self.error(
                    &id.span(),
                    format!("{text:?} is not a SPIFFE ID or ID pattern: {e}"),
                );
                None
            }
        }
    }

    /// The settings and rules that `[unknown]` and identity blocks share;
    /// `names` gets the rule names used, with where.
    fn policy(
        &mut self,
        t: &DeTable,
        owner: Owner,
        names: &mut HashMap<String, Location>,
    ) -> IdentityPolicy {
        let (what, keys, header) = match owner {
            Owner::Unknown => ("[unknown]", UNKNOWN_KEYS, "[[unknown.egress]]"),
            Owner::Identity => (
                "an [[identity]] block",
                IDENTITY_KEYS,
                "[[identity.egress]]",
            ),
        };
        self.known_keys(t, what, keys);
        let mut policy = IdentityPolicy {
            default: t.get("default").and_then(|v| self.keyword("default", v)),
            audit: t.get("audit").and_then(|v| self.boolean("audit", v)),
            raw_sockets: None,
            egress: Vec::new(),
            credentials: Vec::new(),
        };
        let Some(egress) = t.get("egress") else {
            return policy;
        };
        let want = format!("`egress` must be an array of tables ({header})");
        for (rule, table) in self.tables(egress, &want) {
            let before = self.diagnostics.len();
            let parsed = self.rule(rule, table, owner);
            self.unique_name(table, names);
            if self.diagnostics.len() == before {
                policy.egress.extend(parsed);
            }
        }
        policy
    }

    /// Reports a rule's name that an earlier rule of the block (egress or
    /// credential) has, else adds it to `names`.
    fn unique_name(&mut self, t: &DeTable, names: &mut HashMap<String, Location>) {
        let Some(name) = t.get("name") else { return };
        let DeValue::String(n) = name.get_ref() else {
            return;
        };
        if let Some(first) = names.get(n.as_ref()) {
            self.error(
                &name.span(),
                format!(
                    "rule name {n:?} is already used in this block at {first}; rule names identify rules in events and must be unique per block"
                ),
            );
        } else {
            names.insert(n.to_string(), self.source.locate(name.span().start));
        }
    }

    /// A rule's `name`: a string, not empty.
    fn rule_name(&mut self, rule: &Value, t: &DeTable) -> Option<String> {
        let v = self.rule_key(t, rule, "name", "one (it names the rule in events)")?;
        let n = self.string("`name`", v)?;
        if n.trim().is_empty() {
            self.error(&v.span(), "a rule's `name` must not be empty");
            return None;
        }
        Some(n.to_owned())
    }

    /// One egress rule table.
    fn rule(&mut self, rule: &Value, t: &DeTable, owner: Owner) -> Option<EgressRule> {
        self.known_keys(t, "an egress rule", RULE_KEYS);
        let name = self.rule_name(rule, t);
        let action = self
            .rule_key(t, rule, "action", "one (\"allow\" or \"deny\")")
            .and_then(|v| self.keyword("action", v));
        let to = self
            .rule_key(
                t,
                rule,
                "to",
                "its destinations (CIDRs, addresses, DNS names or \"any\")",
            )
            .and_then(|v| {
                let items = self.array(v, WANT_TO)?;
                if items.is_empty() {
                    self.error(
                        &v.span(),
                        "`to` is empty, so the rule matches nothing; list destinations, or \"any\"",
                    );
                }
                Some(
                    items
                        .iter()
                        .filter_map(|d| self.destination(d, owner, action))
                        .collect::<Vec<_>>(),
                )
            });
        let ports = match t.get("ports") {
            None => Some(Vec::new()),
            Some(v) => self.array(v, WANT_PORTS).map(|items| {
                items
                    .iter()
                    .filter_map(|p| self.port_spec(p))
                    .collect::<Vec<_>>()
            }),
        };
        let protocol = match t.get("protocol") {
            None => Some(Protocol::Any),
            Some(v) => self.keyword("protocol", v),
        };
        Some(EgressRule {
            name: name?,
            to: to?,
            ports: ports?,
            protocol: protocol?,
            action: action?,
            at: self.source.locate(rule.span().start),
        })
    }

    /// The `[[identity.credential]]` tables of a block. Two rules of a
    /// block for one host are refused: which would apply is not said.
    fn credentials(
        &mut self,
        v: &Value,
        names: &mut HashMap<String, Location>,
    ) -> Vec<CredentialRule> {
        let want = "`credential` must be an array of tables ([[identity.credential]])";
        let mut out: Vec<CredentialRule> = Vec::new();
        for (rule, table) in self.tables(v, want) {
            let before = self.diagnostics.len();
            let parsed = self.credential(rule, table);
            self.unique_name(table, names);
            if let Some(c) = &parsed
                && let Some(first) = out.iter().find(|o| o.host == c.host)
            {
                let span = table.get("host").map_or_else(|| rule.span(), |h| h.span());
                self.error(
                    &span,
                    format!(
                        "host {} already has a credential rule in this block at {} ({:?}); a host has one credential rule per block",
                        c.host, first.at, first.name
                    ),
                );
            }
            if self.diagnostics.len() == before {
                out.extend(parsed);
            }
        }
        out
    }

    /// One credential rule table.
    fn credential(&mut self, rule: &Value, t: &DeTable) -> Option<CredentialRule> {
        self.known_keys(t, "a credential rule", CREDENTIAL_KEYS);
        let name = self.rule_name(rule, t);
        let host = self
            .rule_key(
                t,
                rule,
                "host",
                "one (the DNS name whose requests get the credential)",
            )
            .and_then(|v| self.host(v));
        let kind = match t.get("kind") {
            None => Some(Kind::Header),
            Some(v) => self.keyword("kind", v),
        };
        let kind = kind?;
        self.keys_of_other_kinds(t, kind);
        let kind = match kind {
            Kind::Header => self.header_credential(rule, t),
            Kind::JwtSvid => self
                .audience(rule, t, kind)
                .map(|audience| CredentialKind::JwtSvid { audience }),
            Kind::OAuth => self.oauth_credential(rule, t),
        };
        let methods = match t.get("methods") {
            None => Some(Vec::new()),
            Some(v) => self.methods(v),
        };
        let paths = match t.get("paths") {
            None => Some(Vec::new()),
            Some(v) => self.paths(v),
        };
        let http = match t.get("http") {
            None => Some(false),
            Some(v) => self.boolean("http", v),
        };
        Some(CredentialRule {
            name: name?,
            host: host?,
            kind: kind?,
            methods: methods?,
            paths: paths?,
            http: http?,
            at: self.source.locate(rule.span().start),
        })
    }

    /// A credential rule's `host`: one exact DNS name.
    fn host(&mut self, v: &Value) -> Option<NamePattern> {
        let s = self.string("`host`", v)?;
        let hint = "`host` is one DNS name the workload connects to (like \"api.example.com\")";
        if looks_like_an_address(s) {
            self.error(
                &v.span(),
                format!(
                    "{s:?} is not a DNS name: {hint}, with no address, port or path; the port is 443 (and 80 with `http = true`)"
                ),
            );
            return None;
        }
        match s.parse::<NamePattern>() {
            Ok(host) if host.is_wildcard() => {
                self.error(
                    &v.span(),
                    format!(
                        "{s:?}: {hint}, not a pattern: the broker needs the exact name to check and to connect to; write one rule per host"
                    ),
                );
                None
            }
            Ok(host) => Some(host),
            Err(e) => {
                self.error(&v.span(), format!("{s:?} is not a DNS name: {e}"));
                None
            }
        }
    }

    /// Reports every key of `t` that belongs to other kinds of credential
    /// rules than `kind`.
    fn keys_of_other_kinds(&mut self, t: &DeTable, kind: Kind) {
        for (key, _) in t.iter() {
            let key_name: &str = key.get_ref().as_ref();
            let owners: Vec<String> = Kind::WORDS
                .iter()
                .filter(|(_, k)| k.keys().contains(&key_name))
                .map(|(w, _)| format!("{w:?}"))
                .collect();
            if owners.is_empty() || kind.keys().contains(&key_name) {
                continue;
            }
            self.error(
                &key.span(),
                format!(
                    "`{key_name}` is a key of credential rules of kind = {}; this rule's kind is {:?}: it {}",
                    owners.join(" or "),
                    kind.word(),
                    kind.adds()
                ),
            );
        }
    }

    /// What a rule of kind `header` adds: `header`, `secret_file` and
    /// `prefix`.
    fn header_credential(&mut self, rule: &Value, t: &DeTable) -> Option<CredentialKind> {
        let needs = |key: &str, like: &str| {
            format!(
                "this credential rule has no `{key}`; a rule of kind \"header\" (the default) needs {like}"
            )
        };
        let header = match t.get("header") {
            None => {
                self.error(
                    &rule.span(),
                    needs("header", "the header's name (like header = \"x-api-key\")"),
                );
                None
            }
            Some(v) => self.header_name(v),
        };
        let secret_file = match t.get("secret_file") {
            None => {
                self.error(
                    &rule.span(),
                    needs(
                        "secret_file",
                        "the file holding the secret (like secret_file = \"/etc/idgate/secrets/api-key\")",
                    ),
                );
                None
            }
            Some(v) => self.string("`secret_file`", v).and_then(|s| {
                let path = PathBuf::from(s);
                if path.is_absolute() {
                    return Some(path);
                }
                self.error(
                    &v.span(),
                    format!("`secret_file` {s:?} must be an absolute path"),
                );
                None
            }),
        };
        let prefix = match t.get("prefix") {
            None => Some(String::new()),
            Some(v) => self.string("`prefix`", v).and_then(|s| {
                if s.chars().all(|c| c == ' ' || c == '\t' || !c.is_control()) {
                    return Some(s.to_owned());
                }
                self.error(
                    &v.span(),
                    "`prefix` must not hold control characters: it goes into a header value",
                );
                None
            }),
        };
        Some(CredentialKind::Header {
            header: header?,
            secret_file: secret_file?,
            prefix: prefix?,
        })
    }

    /// A header name, lowercase; not one the broker sets itself.
    fn header_name(&mut self, v: &Value) -> Option<String> {
        let s = self.string("`header`", v)?;
        let Ok(name) = http::HeaderName::from_bytes(s.as_bytes()) else {
            self.error(
                &v.span(),
                format!(
                    "`header` {s:?} is not an HTTP header name (letters, digits and !#$%&'*+-.^_`|~)"
                ),
            );
            return None;
        };
        if RESERVED_HEADERS.contains(&name.as_str()) {
            self.error(
                &v.span(),
                format!(
                    "`header` {s:?} frames the request and cannot carry a credential; the broker sets it itself"
                ),
            );
            return None;
        }
        Some(name.as_str().to_owned())
    }

    /// The JWT-SVID's `audience` of a rule of `kind` (`jwt_svid` or
    /// `oauth`): required, not empty.
    fn audience(&mut self, rule: &Value, t: &DeTable, kind: Kind) -> Option<Vec<String>> {
        let want = "`audience` must be an array of strings (like audience = [\"https://api.example.com\"])";
        let v = match t.get("audience") {
            Some(v) => v,
            None => {
                self.error(
                    &rule.span(),
                    format!(
                        "this credential rule has no `audience`; a rule of kind {:?} needs the JWT-SVID's audience ({want})",
                        kind.word()
                    ),
                );
                return None;
            }
        };
        if self.array(v, want)?.is_empty() {
            self.error(
                &v.span(),
                "`audience` is empty; a JWT-SVID names at least one audience",
            );
            return None;
        }
        self.strings(v, want, "an audience", |s| match s.is_empty() {
            true => Err("an audience must not be empty".to_owned()),
            false => Ok(s.to_owned()),
        })
    }

    /// What a rule of kind `oauth` adds: an access token from
    /// `token_endpoint`, got with the JWT-SVID for `audience` as `grant`
    /// says, with the optional parameters.
    fn oauth_credential(&mut self, rule: &Value, t: &DeTable) -> Option<CredentialKind> {
        let token_endpoint = match t.get("token_endpoint") {
            None => {
                self.error(
                    &rule.span(),
                    "this credential rule has no `token_endpoint`; a rule of kind \"oauth\" needs the token endpoint's URL (like token_endpoint = \"https://sts.example.com/oauth2/token\")",
                );
                None
            }
            Some(v) => self.token_endpoint(v),
        };
        let grant = match t.get("grant") {
            None => Some(OAuthGrant::TokenExchange),
            Some(v) => self.keyword("grant", v),
        };
        let audience = self.audience(rule, t, Kind::OAuth);
        let scope = self.parameter(t, "scope");
        let resource = self.parameter(t, "resource");
        let token_audience = self.parameter(t, "token_audience");
        let client_id = self.parameter(t, "client_id");
        if let (Some(Some(r)), Some(v)) = (&resource, t.get("resource"))
            && !is_absolute_uri(r)
        {
            self.error(
                &v.span(),
                format!(
                    "`resource` {r:?} is not an absolute URI without a fragment (like \"https://api.example.com/\"), as RFC 8707 wants"
                ),
            );
            return None;
        }
        Some(CredentialKind::OAuth(OAuthClient {
            token_endpoint: token_endpoint?,
            grant: grant?,
            audience: audience?,
            scope: scope?,
            resource: resource?,
            token_audience: token_audience?,
            client_id: client_id?,
        }))
    }

    /// `token_endpoint`: an `https` URL, or an `http` one for a loopback
    /// host; no user name or fragment.
    fn token_endpoint(&mut self, v: &Value) -> Option<http::Uri> {
        let s = self.string("`token_endpoint`", v)?;
        let problem = match s.parse::<http::Uri>() {
            // The parser drops a fragment: refuse it instead.
            _ if s.contains('#') => "must not hold a fragment (`#`)".to_owned(),
            Err(e) => format!("is not a URL: {e}"),
            Ok(uri) => match endpoint_problem(&uri) {
                None => return Some(uri),
                Some(p) => p,
            },
        };
        self.error(&v.span(), format!("`token_endpoint` {s:?} {problem}"));
        None
    }

    /// An optional string parameter of a token request: not empty, no
    /// control characters. `Some(None)` when it is not set.
    fn parameter(&mut self, t: &DeTable, key: &str) -> Option<Option<String>> {
        let Some(v) = t.get(key) else {
            return Some(None);
        };
        let s = self.string(&format!("`{key}`"), v)?;
        if s.trim().is_empty() {
            self.error(
                &v.span(),
                format!("`{key}` is empty; leave it out to send none"),
            );
            return None;
        }
        if s.chars().any(char::is_control) {
            self.error(
                &v.span(),
                format!("`{key}` must not hold control characters"),
            );
            return None;
        }
        Some(Some(s.to_owned()))
    }

    /// `methods`: HTTP method tokens, uppercase.
    fn methods(&mut self, v: &Value) -> Option<Vec<String>> {
        let want =
            "`methods` must be an array of HTTP methods (like methods = [\"GET\", \"POST\"])";
        self.strings(v, want, "a method", |s| {
            let s = s.to_ascii_uppercase();
            if !s.is_empty() && http::Method::from_bytes(s.as_bytes()).is_ok() {
                return Ok(s);
            }
            Err(format!("{s:?} is not an HTTP method"))
        })
    }

    /// `paths`: path prefixes, each starting with `/`.
    fn paths(&mut self, v: &Value) -> Option<Vec<String>> {
        let want = "`paths` must be an array of path prefixes (like paths = [\"/v1/messages\"])";
        self.strings(v, want, "a path", |s| {
            if !s.starts_with('/') {
                return Err(format!("path {s:?} must start with `/`"));
            }
            if let Some(c) = s
                .chars()
                .find(|c| c.is_whitespace() || c.is_control() || *c == '?' || *c == '#')
            {
                return Err(format!(
                    "path {s:?} has {c:?}; a path prefix has no spaces, query or fragment"
                ));
            }
            Ok(s.to_owned())
        })
    }

    /// Every string of the array `v` (`want` says what it must be, `what`
    /// one item), each as `check` makes it or the error it gives,
    /// reported at the item; every item is read, so every problem is
    /// reported. `None` if any is not fit.
    fn strings(
        &mut self,
        v: &Value,
        want: &str,
        what: &str,
        check: impl Fn(&str) -> Result<String, String>,
    ) -> Option<Vec<String>> {
        let items = self.array(v, want)?;
        let checked: Vec<Option<String>> = items
            .iter()
            .map(|item| match check(self.string(what, item)?) {
                Ok(s) => Some(s),
                Err(problem) => {
                    self.error(&item.span(), problem);
                    None
                }
            })
            .collect();
        checked.into_iter().collect()
    }

    /// One item of `to`, in a rule of `owner` with `action` (if valid).
    fn destination(
        &mut self,
        v: &Value,
        owner: Owner,
        action: Option<Action>,
    ) -> Option<Destination> {
        let s = self.string("a destination in `to`", v)?;
        if s == "any" {
            return Some(Destination::Any);
        }
        let Ok(net) = s
            .parse::<IpNet>()
            .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        else {
            if !looks_like_an_address(s) {
                return self.name(v, s, owner, action);
            }
            self.error(
                &v.span(),
                format!(
                    "{s:?} is not a CIDR (like 10.0.0.0/8 or fd00::/8), an address, a DNS name, or \"any\""
                ),
            );
            return None;
        };
        if net.trunc() != net {
            self.error(
                &v.span(),
                format!(
                    "{s:?} has host bits set beyond its /{} prefix; did you mean {}?",
                    net.prefix_len(),
                    net.trunc()
                ),
            );
            return None;
        }
        Some(Destination::Net(net))
    }

    /// A DNS name of `to`: only in allow rules of identity blocks.
    fn name(
        &mut self,
        v: &Value,
        s: &str,
        owner: Owner,
        action: Option<Action>,
    ) -> Option<Destination> {
        let name = match s.parse::<NamePattern>() {
            Ok(name) => name,
            Err(e) => {
                self.error(&v.span(), format!("{s:?} is not a DNS name: {e}"));
                return None;
            }
        };
        if owner == Owner::Unknown {
            self.error(
                &v.span(),
                format!(
                    "{s:?}: rules of [unknown] cannot name hosts: unknown workloads share one policy, so the lookup of one would open the address for all; write the addresses (CIDRs)"
                ),
            );
            return None;
        }
        if action == Some(Action::Deny) {
            self.error(
                &v.span(),
                format!(
                    "{s:?}: a deny rule cannot name hosts: a workload walks around it by connecting to the address without a lookup; deny the addresses (CIDRs) instead"
                ),
            );
            return None;
        }
        Some(Destination::Name(name))
    }

    /// `443`, or `"8000-8080"` (a range, inclusive) or `"443"`.
    fn port_spec(&mut self, v: &Value) -> Option<PortSpec> {
        let read = match v.get_ref() {
            DeValue::Integer(i) => ports::port(i.as_str(), i.radix()).map(|p| (p, p)),
            DeValue::String(s) => ports::range(s),
            other => {
                self.error(
                    &v.span(),
                    format!(
                        "a port must be a number or a range like \"8000-8080\", not {}",
                        a(other)
                    ),
                );
                return None;
            }
        };
        match read {
            Ok((first, last)) => Some(PortSpec { first, last }),
            Err(e) => {
                let hint = if e == PortError::Zero {
                    " (leave `ports` out for every port)"
                } else {
                    ""
                };
                self.error(&v.span(), format!("{e}{hint}"));
                None
            }
        }
    }

    /// Reports every key of `t` not in `known`.
    fn known_keys(&mut self, t: &DeTable, what: &str, known: &[&str]) {
        for key in t.keys() {
            if !known.contains(&key.get_ref().as_ref()) {
                self.error(
                    &key.span(),
                    format!(
                        "unknown key `{}` in {what}; expected one of: {}",
                        key.get_ref(),
                        known.join(", ")
                    ),
                );
            }
        }
    }

    /// The value of a key every rule must have; its absence is reported
    /// at the rule.
    fn rule_key<'v, 'i>(
        &mut self,
        t: &'v DeTable<'i>,
        table: &Value,
        key: &str,
        want: &str,
    ) -> Option<&'v Value<'i>> {
        let v = t.get(key);
        if v.is_none() {
            self.error(
                &table.span(),
                format!("this rule has no `{key}`; every rule needs {want}"),
            );
        }
        v
    }

    /// The tables of an array of tables (with their spans); `want` says
    /// what it must be.
    fn tables<'v, 'i>(
        &mut self,
        v: &'v Value<'i>,
        want: &str,
    ) -> Vec<(&'v Value<'i>, &'v DeTable<'i>)> {
        let Some(items) = self.array(v, want) else {
            return Vec::new();
        };
        items
            .iter()
            .filter_map(|item| match item.get_ref() {
                DeValue::Table(t) => Some((item, t)),
                other => {
                    let message = format!("{want}, not an array of {}s", other.type_str());
                    self.error(&item.span(), message);
                    None
                }
            })
            .collect()
    }

    /// The items of an array; `want` says what it must be.
    fn array<'v, 'i>(&mut self, v: &'v Value<'i>, want: &str) -> Option<&'v [Value<'i>]> {
        match v.get_ref() {
            DeValue::Array(items) => Some(items),
            other => {
                self.error(&v.span(), format!("{want}, not {}", a(other)));
                None
            }
        }
    }

    /// A string; `what` names it in the message.
    fn string<'v>(&mut self, what: &str, v: &'v Value) -> Option<&'v str> {
        match v.get_ref() {
            DeValue::String(s) => Some(s),
            other => {
                self.error(
                    &v.span(),
                    format!("{what} must be a string, not {}", a(other)),
                );
                None
            }
        }
    }

    fn boolean(&mut self, key: &str, v: &Value) -> Option<bool> {
        match v.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            other => {
                self.error(
                    &v.span(),
                    format!("`{key}` must be true or false, not {}", a(other)),
                );
                None
            }
        }
    }

    fn keyword<K: Keyword>(&mut self, key: &str, v: &Value) -> Option<K> {
        let words: Vec<String> = K::WORDS.iter().map(|(w, _)| format!("{w:?}")).collect();
        let words = words.join(", ");
        let DeValue::String(s) = v.get_ref() else {
            let message = format!("`{key}` must be one of {words}, not {}", a(v.get_ref()));
            self.error(&v.span(), message);
            return None;
        };
        let found = K::WORDS.iter().find(|(w, _)| w == s).map(|(_, k)| *k);
        if found.is_none() {
            self.error(&v.span(), format!("`{key}` {s:?} is not one of {words}"));
        }
        found
    }
}

/// What a credential rule adds, as its `kind` is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Header,
    JwtSvid,
    OAuth,
}

impl Keyword for Kind {
    const WORDS: &'static [(&'static str, Self)] = &[
        ("header", Self::Header),
        ("jwt_svid", Self::JwtSvid),
        ("oauth", Self::OAuth),
    ];
}

impl Kind {
    /// The keys of rules of this kind only (or of a few kinds).
    fn keys(self) -> &'static [&'static str] {
        match self {
            Self::Header => HEADER_KEYS,
            Self::JwtSvid => JWT_SVID_KEYS,
            Self::OAuth => OAUTH_KEYS,
        }
    }

    /// What rules of this kind add, after "it".
    fn adds(self) -> &'static str {
        match self {
            Self::Header => "adds `header` with the secret read from `secret_file`",
            Self::JwtSvid => "sets `authorization: Bearer` and the identity's JWT-SVID",
            Self::OAuth => "sets `authorization: Bearer` and an access token from `token_endpoint`",
        }
    }
}

/// What makes `uri` unfit as a token endpoint, if anything: it must be
/// an absolute `https` URL (`http` only for a loopback host) without a
/// user name.
fn endpoint_problem(uri: &http::Uri) -> Option<String> {
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return Some(
            "is not an absolute URL (like \"https://sts.example.com/oauth2/token\")".into(),
        );
    };
    if authority.as_str().contains('@') {
        return Some("must not hold a user name or password".into());
    }
    let host = authority.host();
    if host.is_empty() {
        return Some("has no host".into());
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let ip = bare.parse::<std::net::IpAddr>().ok();
    if ip.is_none() && !bare.parse::<NamePattern>().is_ok_and(|n| !n.is_wildcard()) {
        return Some(format!(
            "has host {host:?}, which is neither an address nor a DNS name"
        ));
    }
    let loopback = ip.is_some_and(|ip| ip.is_loopback()) || bare.eq_ignore_ascii_case("localhost");
    match scheme {
        "https" => None,
        "http" if loopback => None,
        "http" => Some(
            "must be https: the JWT-SVID and the access token would cross the network in clear text (http is only for a loopback host)".into(),
        ),
        other => Some(format!("has scheme {other:?}; a token endpoint is https")),
    }
}

/// Whether `s` is an absolute URI (a scheme, a `:`, more) without a
/// fragment.
fn is_absolute_uri(s: &str) -> bool {
    let Some((scheme, rest)) = s.split_once(':') else {
        return false;
    };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        && !rest.is_empty()
        && !s.contains('#')
        && !s.contains(char::is_whitespace)
}

/// Whose rules are read: the unknown workload's may not name hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Unknown,
    Identity,
}

/// Whether a destination that is not a valid CIDR or address was meant
/// as one (and is reported so) rather than as a DNS name: it has a `/`
/// or a `:`, or its last label is a number (no top-level domain is).
pub(crate) fn looks_like_an_address(s: &str) -> bool {
    let last = s.strip_suffix('.').unwrap_or(s).rsplit('.').next();
    s.contains(['/', ':'])
        || last.is_some_and(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
}

/// "a string", "an integer", ...
fn a(v: &DeValue) -> String {
    let t = v.type_str();
    let article = if t.starts_with(['a', 'i']) { "an" } else { "a" };
    format!("{article} {t}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testing::{errors, policy};

    /// Checks that `text` yields exactly the problems `want`, as (line,
    /// part of the message), in order.
    fn assert_errors(text: &str, want: &[(u32, &str)]) {
        let got = errors(text);
        assert_eq!(got.len(), want.len(), "{got:#?}");
        for ((line, message), (want_line, part)) in got.iter().zip(want) {
            assert_eq!(line, want_line, "{message}");
            assert!(message.contains(part), "{part:?} not in {message:?}");
        }
    }

    #[test]
    fn parses_every_setting() {
        let p = policy(
            r#"
            mode = "audit"
            [unknown]
            default = "allow"
            audit = false
            [[unknown.egress]]
            name = "dns"
            to = ["127.0.0.53"]
            ports = [53]
            protocol = "udp"
            action = "allow"
            [[identity]]
            id = "spiffe://example.org/web"
            egress = [
                { name = "api", to = ["127.0.0.1/32", "::1", "any"], ports = [443, "8000-8080", "9000", 0x50], protocol = "tcp", action = "deny" },
            ]
            [[identity]]
            id = "spiffe://example.org/agents/*"
            "#,
        );
        assert_eq!(p.mode, Mode::Audit);
        assert_eq!(p.unknown.default, Some(Action::Allow));
        assert_eq!(p.unknown.audit, Some(false));
        assert_eq!(p.unknown.egress[0].protocol, Protocol::Udp);
        let web = &p.identities[0];
        assert_eq!(web.subject.to_string(), "spiffe://example.org/web");
        assert_eq!(web.at.line, 13);
        assert_eq!(web.policy.default, None);
        let rule = &web.policy.egress[0];
        assert_eq!(rule.at.line, 15);
        assert_eq!(rule.action, Action::Deny);
        assert_eq!(
            rule.to,
            [
                Destination::Net("127.0.0.1/32".parse().unwrap()),
                Destination::Net("::1/128".parse().unwrap()),
                Destination::Any
            ]
        );
        let ports: Vec<(u16, u16)> = rule.ports.iter().map(|p| (p.first, p.last)).collect();
        assert_eq!(ports, [(443, 443), (8000, 8080), (9000, 9000), (80, 80)]);
        assert!(matches!(p.identities[1].subject, Subject::Pattern(_)));
        // Left out, a rule's protocol is `any` and its ports are all ports.
        let p = policy(
            "[[identity]]\nid = \"spiffe://e.org/a\"\n[[identity.egress]]\nname = \"r\"\nto = [\"any\"]\naction = \"allow\"\n",
        );
        let rule = &p.identities[0].policy.egress[0];
        assert_eq!(rule.protocol, Protocol::Any);
        assert_eq!(rule.port_ranges(), [(0, u16::MAX)]);
    }

    #[test]
    fn reports_every_problem_with_its_line() {
        let text = r#"mode = "strict"
colour = "red"
[unknown]
default = "maybe"
id = "spiffe://example.org/x"
[[identity]]
id = "spiffe://example.org/web"
audit = "yes"
[[identity.egress]]
name = "bad-cidr"
to = ["10.0.0.0/33"]
action = "allow"
[[identity.egress]]
name = "host-bits"
to = ["10.0.0.1/8"]
action = "allow"
[[identity.egress]]
name = "port-zero"
to = ["any"]
ports = [0]
action = "allow"
[[identity.egress]]
name = "port-big"
to = ["any"]
ports = [70000]
action = "allow"
[[identity.egress]]
name = "reversed"
to = ["any"]
ports = ["90-80"]
action = "allow"
[[identity.egress]]
name = "icmp"
to = ["any"]
protocol = "icmp"
action = "allow"
[[identity.egress]]
name = "maybe"
to = ["any"]
action = "permit"
[[identity.egress]]
name = "typo"
to = ["any"]
action = "allow"
port = [80]
[[identity.egress]]
to = "any"
[[identity.egress]]
name = "empty"
to = []
action = "deny"
[[identity]]
id = "spiffe://example.org/a*"
[[identity]]
default = "deny"
[[identity]]
id = "https://example.org/x"
"#;
        assert_errors(
            text,
            &[
                (1, r#"`mode` "strict" is not one of "enforce", "audit""#),
                (2, "unknown key `colour` in a policy file"),
                (4, r#"`default` "maybe" is not one of "allow", "deny""#),
                (
                    5,
                    "unknown key `id` in [unknown]; expected one of: default, audit, egress",
                ),
                (8, "`audit` must be true or false, not a string"),
                (11, r#""10.0.0.0/33" is not a CIDR"#),
                (
                    15,
                    r#""10.0.0.1/8" has host bits set beyond its /8 prefix; did you mean 10.0.0.0/8?"#,
                ),
                (20, "port 0 is not a destination port"),
                (25, "port 70000 is out of range"),
                (30, r#"port range "90-80" is reversed; write "80-90""#),
                (35, r#"`protocol` "icmp" is not one of "tcp", "udp", "any""#),
                (40, r#"`action` "permit" is not one of "allow", "deny""#),
                (
                    45,
                    "unknown key `port` in an egress rule; expected one of: name, to, ports, protocol, action",
                ),
                (46, "this rule has no `name`"),
                (46, "this rule has no `action`"),
                (
                    47,
                    "`to` must be an array of CIDRs, addresses, DNS names or \"any\" (like to = [\"10.0.0.0/8\", \"api.example.com\"]), not a string",
                ),
                (50, "`to` is empty"),
                (53, "`*` may only end a pattern"),
                (54, "this [[identity]] block has no `id`"),
                (
                    57,
                    r#""https://example.org/x" is not a SPIFFE ID or ID pattern: a SPIFFE ID starts with "spiffe://""#,
                ),
            ],
        );
    }

    #[test]
    fn reports_values_of_the_wrong_type() {
        assert_errors(
            "[identity]\nid = \"spiffe://e.org/a\"\n",
            &[(
                1,
                "`identity` must be an array of tables ([[identity]]), not a table",
            )],
        );
        assert_errors(
            "unknown = 3\nidentity = [1]\n",
            &[
                (1, "`unknown` must be a table ([unknown]), not an integer"),
                (
                    2,
                    "`identity` must be an array of tables ([[identity]]), not an array of integers",
                ),
            ],
        );
        assert_errors(
            "[unknown]\negress = 5\n[[identity]]\nid = 7\nmode = \"audit\"\negress = [{ name = 1, to = [5, \"any\"], ports = \"80\", action = true }]\n",
            &[
                (
                    2,
                    "`egress` must be an array of tables ([[unknown.egress]]), not an integer",
                ),
                (4, "`id` must be a string, not an integer"),
                (5, "unknown key `mode` in an [[identity]] block"),
                (6, "`name` must be a string, not an integer"),
                (6, "a destination in `to` must be a string, not an integer"),
                (6, "`ports` must be an array of ports and ranges"),
                (
                    6,
                    "`action` must be one of \"allow\", \"deny\", not a boolean",
                ),
            ],
        );
        assert_errors(
            "[[identity]]\nid = \"spiffe://e.org/a\"\n[[identity.egress]]\nname = \"\"\nto = [\"any\"]\nports = [true, \"http\", \"1-x\", -4]\naction = \"deny\"\n",
            &[
                (4, "a rule's `name` must not be empty"),
                (
                    6,
                    "a port must be a number or a range like \"8000-8080\", not a boolean",
                ),
                (6, "\"http\" is not a port number"),
                (6, "\"x\" is not a port number"),
                (6, "port -4 is out of range"),
            ],
        );
    }

    #[test]
    fn raw_sockets_is_a_setting_of_identity_blocks_only() {
        let p = policy("[[identity]]\nid = \"spiffe://e.org/a\"\nraw_sockets = true\n");
        assert_eq!(p.identities[0].policy.raw_sockets, Some(true));
        assert_errors(
            "[unknown]\nraw_sockets = true\n[[identity]]\nid = \"spiffe://e.org/a\"\nraw_sockets = 1\n",
            &[
                (
                    2,
                    "unknown key `raw_sockets` in [unknown]; expected one of: default, audit, egress",
                ),
                (5, "`raw_sockets` must be true or false, not an integer"),
            ],
        );
    }

    #[test]
    fn reports_syntax_errors_and_nothing_else_for_that_file() {
        assert_errors(
            "mode = \"audit\"\nmode = \"enforce\"\ncolour = \n",
            &[
                (2, "invalid TOML: duplicate key"),
                (3, "invalid TOML: string values must be quoted"),
            ],
        );
    }

    #[test]
    fn names_mix_with_addresses_and_are_canonical() {
        let p = policy(
            "[[identity]]\nid = \"spiffe://e.org/a\"\n[[identity.egress]]\nname = \"r\"\nto = [\"10.0.0.0/8\", \"API.Example.com.\", \"*.example.org\", \"_dmarc.example.com\"]\nports = [443]\naction = \"allow\"\n",
        );
        let rule = &p.identities[0].policy.egress[0];
        let names: Vec<&str> = rule.names().map(|n| n.as_str()).collect();
        assert_eq!(
            names,
            ["api.example.com", "*.example.org", "_dmarc.example.com"]
        );
        assert_eq!(rule.nets().count(), 1);
    }

    #[test]
    fn reports_bad_names_where_they_are_written() {
        let long_label = format!("{}.com", "a".repeat(64));
        let long_name = format!("{}.com", vec!["a".repeat(63); 4].join("."));
        let text = format!(
            r#"[[identity]]
id = "spiffe://example.org/web"
[[identity.egress]]
name = "names"
action = "allow"
to = [
  "{long_label}",
  "{long_name}",
  "a_b!.com",
  "api.*.com",
  "foo*.x",
  "*",
  "bücher.de",
  "",
  "-x.com",
  "10.0.0",
]
"#
        );
        assert_errors(
            &text,
            &[
                (7, "is not a DNS name: label \"aaaa"),
                (
                    8,
                    "is not a DNS name: it is 259 characters long; a name has at most 253",
                ),
                (9, r#""a_b!.com" is not a DNS name: label "a_b!" has '!'"#),
                (
                    10,
                    r#""api.*.com" is not a DNS name: `*` may only be the whole first label"#,
                ),
                (11, r#""foo*.x" is not a DNS name: `*` may only"#),
                (12, r#""*" is not a DNS name: `*` may only"#),
                (
                    13,
                    r#""bücher.de" is not a DNS name: it is not ASCII; write its ASCII (punycode) form "xn--bcher-kva.de""#,
                ),
                (14, r#""" is not a DNS name: it is empty"#),
                (
                    15,
                    r#""-x.com" is not a DNS name: label "-x" starts or ends with `-`"#,
                ),
                (16, r#""10.0.0" is not a CIDR"#),
            ],
        );
        let dir = crate::policy::testing::PolicyDir::new(&[("p.toml", &text)]);
        let e = dir.load(&[]).unwrap_err();
        assert_eq!(e.diagnostics[0].position, Some((7, 3)));
        assert!(
            e.diagnostics[0]
                .message
                .contains("is 64 characters long; a label has at most 63")
        );
    }

    #[test]
    fn names_are_refused_in_unknown_and_in_deny_rules() {
        assert_errors(
            r#"[[unknown.egress]]
name = "u"
to = ["10.0.0.1", "api.example.com"]
action = "allow"
[[identity]]
id = "spiffe://example.org/web"
[[identity.egress]]
name = "d"
to = ["*.example.com"]
action = "deny"
"#,
            &[
                (
                    3,
                    r#""api.example.com": rules of [unknown] cannot name hosts: unknown workloads share one policy"#,
                ),
                (
                    9,
                    r#""*.example.com": a deny rule cannot name hosts: a workload walks around it by connecting to the address without a lookup; deny the addresses (CIDRs) instead"#,
                ),
            ],
        );
    }

    #[test]
    fn rule_names_are_unique_within_a_block() {
        let rule = |name: &str, addr: &str| {
            format!(
                "[[identity.egress]]\nname = \"{name}\"\nto = [\"{addr}\"]\naction = \"allow\"\n"
            )
        };
        let text = format!(
            "[[identity]]\nid = \"spiffe://example.org/web\"\n{}{}[[identity]]\nid = \"spiffe://example.org/db\"\n{}",
            rule("a", "10.0.0.1"),
            rule("a", "10.0.0.2"),
            rule("a", "10.0.0.1"),
        );
        let got = errors(&text);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0, 8);
        assert!(
            got[0]
                .1
                .starts_with("rule name \"a\" is already used in this block at ")
        );
        assert!(got[0].1.contains("p.toml:4:8;"), "{}", got[0].1);
    }

    #[test]
    fn parses_credential_rules() {
        let secret = crate::policy::testing::secret_file().display().to_string();
        let p = policy(&format!(
            r#"[[identity]]
id = "spiffe://example.org/agent"
[[identity.egress]]
name = "docs"
to = ["docs.example.com"]
action = "allow"
[[identity.credential]]
name = "anthropic"
host = "API.Anthropic.com."
header = "X-Api-Key"
secret_file = "{secret}"
[[identity.credential]]
name = "internal"
host = "internal.example.com"
kind = "jwt_svid"
audience = ["https://internal.example.com", "other"]
methods = ["get", "POST", "PROPFIND"]
paths = ["/v1/", "/"]
http = true
[[identity.credential]]
name = "bearer"
host = "api.openai.com"
kind = "header"
header = "authorization"
secret_file = "{secret}"
prefix = "Bearer "
"#
        ));
        let c = &p.identities[0].policy.credentials;
        assert_eq!(c.len(), 3);
        assert_eq!(c[0].name, "anthropic");
        assert_eq!(c[0].host.as_str(), "api.anthropic.com");
        assert_eq!(
            c[0].kind,
            CredentialKind::Header {
                header: "x-api-key".into(),
                secret_file: secret.clone().into(),
                prefix: String::new(),
            }
        );
        assert!(c[0].methods.is_empty() && c[0].paths.is_empty() && !c[0].http);
        assert_eq!(c[0].at.line, 7);
        assert_eq!(c[0].ports(), [(443, 443)]);
        assert_eq!(
            c[1].kind,
            CredentialKind::JwtSvid {
                audience: vec!["https://internal.example.com".into(), "other".into()]
            }
        );
        assert_eq!(c[1].kind.header(), "authorization");
        assert_eq!(c[1].methods, ["GET", "POST", "PROPFIND"]);
        assert_eq!(c[1].paths, ["/v1/", "/"]);
        assert!(c[1].http);
        assert_eq!(c[1].ports(), [(80, 80), (443, 443)]);
        assert!(matches!(&c[2].kind, CredentialKind::Header { prefix, .. } if prefix == "Bearer "));
        assert_eq!(p.identities[0].policy.egress.len(), 1);
    }

    #[test]
    fn parses_oauth_credential_rules() {
        let p = policy(
            r#"[[identity]]
id = "spiffe://example.org/agent"
[[identity.credential]]
name = "exchange"
host = "api.example.com"
kind = "oauth"
token_endpoint = "https://sts.example.com:8443/oauth2/token?tenant=t1"
audience = ["https://sts.example.com"]
[[identity.credential]]
name = "client"
host = "saas.example.com"
kind = "oauth"
token_endpoint = "http://127.0.0.1:9000/token"
grant = "client_credentials"
audience = ["sts", "other"]
scope = "read write"
resource = "https://saas.example.com/"
token_audience = "saas"
client_id = "idgate"
methods = ["GET"]
[[identity.credential]]
name = "v6"
host = "v6.example.com"
kind = "oauth"
token_endpoint = "http://[::1]/token"
grant = "token_exchange"
audience = ["a"]
resource = "urn:example:api"
[[identity.credential]]
name = "local"
host = "local.example.com"
kind = "oauth"
token_endpoint = "http://LocalHost:8080/token"
audience = ["a"]
"#,
        );
        let c = &p.identities[0].policy.credentials;
        assert_eq!(c.len(), 4);
        assert_eq!(
            c[0].kind,
            CredentialKind::OAuth(OAuthClient {
                token_endpoint: "https://sts.example.com:8443/oauth2/token?tenant=t1"
                    .parse()
                    .unwrap(),
                grant: OAuthGrant::TokenExchange,
                audience: vec!["https://sts.example.com".into()],
                scope: None,
                resource: None,
                token_audience: None,
                client_id: None,
            })
        );
        assert_eq!(c[0].kind.header(), "authorization");
        assert_eq!(c[0].ports(), [(443, 443)]);
        assert_eq!(
            c[1].kind,
            CredentialKind::OAuth(OAuthClient {
                token_endpoint: "http://127.0.0.1:9000/token".parse().unwrap(),
                grant: OAuthGrant::ClientCredentials,
                audience: vec!["sts".into(), "other".into()],
                scope: Some("read write".into()),
                resource: Some("https://saas.example.com/".into()),
                token_audience: Some("saas".into()),
                client_id: Some("idgate".into()),
            })
        );
        assert_eq!(c[1].methods, ["GET"]);
        assert!(
            matches!(&c[2].kind, CredentialKind::OAuth(o) if o.resource.as_deref() == Some("urn:example:api"))
        );
    }

    #[test]
    fn reports_every_oauth_problem_with_its_line() {
        let secret = crate::policy::testing::secret_file().display().to_string();
        let text = format!(
            r#"[[identity]]
id = "spiffe://example.org/agent"
[[identity.credential]]
name = "none"
host = "a.example.com"
kind = "oauth"
[[identity.credential]]
name = "clear"
host = "b.example.com"
kind = "oauth"
token_endpoint = "http://sts.example.com/token"
audience = ["sts"]
[[identity.credential]]
name = "scheme"
host = "c.example.com"
kind = "oauth"
token_endpoint = "ftp://sts.example.com/token"
audience = ["sts"]
[[identity.credential]]
name = "relative"
host = "d.example.com"
kind = "oauth"
token_endpoint = "/token"
audience = ["sts"]
[[identity.credential]]
name = "user"
host = "e.example.com"
kind = "oauth"
token_endpoint = "https://me:pw@sts.example.com/token"
audience = ["sts"]
[[identity.credential]]
name = "fragment"
host = "f.example.com"
kind = "oauth"
token_endpoint = "https://sts.example.com/token#x"
audience = ["sts"]
[[identity.credential]]
name = "not-a-url"
host = "g.example.com"
kind = "oauth"
token_endpoint = "https://sts example/token"
audience = []
[[identity.credential]]
name = "params"
host = "h.example.com"
kind = "oauth"
token_endpoint = "https://sts.example.com/token"
audience = ["sts"]
grant = "password"
scope = ""
client_id = 7
token_audience = "a\u0001"
[[identity.credential]]
name = "resource"
host = "i.example.com"
kind = "oauth"
token_endpoint = "https://sts.example.com/token"
audience = ["sts"]
resource = "/relative"
[[identity.credential]]
name = "mixed"
host = "j.example.com"
kind = "oauth"
token_endpoint = "https://sts.example.com/token"
audience = ["sts"]
header = "x-key"
secret_file = "{secret}"
[[identity.credential]]
name = "jwt"
host = "k.example.com"
kind = "jwt_svid"
audience = ["x"]
token_endpoint = "https://sts.example.com/token"
scope = "s"
[[identity.credential]]
name = "wild"
host = "l.example.com"
kind = "oauth"
token_endpoint = "https://*.example.com/token"
audience = ["sts"]
"#
        );
        assert_errors(
            &text,
            &[
                (
                    3,
                    "this credential rule has no `token_endpoint`; a rule of kind \"oauth\" needs the token endpoint's URL",
                ),
                (
                    3,
                    "this credential rule has no `audience`; a rule of kind \"oauth\" needs the JWT-SVID's audience",
                ),
                (
                    11,
                    "`token_endpoint` \"http://sts.example.com/token\" must be https: the JWT-SVID and the access token would cross the network in clear text (http is only for a loopback host)",
                ),
                (
                    17,
                    "`token_endpoint` \"ftp://sts.example.com/token\" has scheme \"ftp\"",
                ),
                (23, "`token_endpoint` \"/token\" is not an absolute URL"),
                (
                    29,
                    "`token_endpoint` \"https://me:pw@sts.example.com/token\" must not hold a user name or password",
                ),
                (
                    35,
                    "`token_endpoint` \"https://sts.example.com/token#x\" must not hold a fragment",
                ),
                (
                    41,
                    "`token_endpoint` \"https://sts example/token\" is not a URL",
                ),
                (42, "`audience` is empty"),
                (
                    49,
                    "`grant` \"password\" is not one of \"token_exchange\", \"client_credentials\"",
                ),
                (50, "`scope` is empty; leave it out to send none"),
                (51, "`client_id` must be a string, not an integer"),
                (52, "`token_audience` must not hold control characters"),
                (
                    59,
                    "`resource` \"/relative\" is not an absolute URI without a fragment",
                ),
                (
                    66,
                    "`header` is a key of credential rules of kind = \"header\"; this rule's kind is \"oauth\": it sets `authorization: Bearer` and an access token from `token_endpoint`",
                ),
                (
                    67,
                    "`secret_file` is a key of credential rules of kind = \"header\"",
                ),
                (
                    73,
                    "`token_endpoint` is a key of credential rules of kind = \"oauth\"; this rule's kind is \"jwt_svid\"",
                ),
                (
                    74,
                    "`scope` is a key of credential rules of kind = \"oauth\"",
                ),
                (
                    79,
                    "`token_endpoint` \"https://*.example.com/token\" has host \"*.example.com\", which is neither an address nor a DNS name",
                ),
            ],
        );
    }

    #[test]
    fn reports_every_credential_problem_with_its_line() {
        let secret = crate::policy::testing::secret_file().display().to_string();
        let text = format!(
            r#"[[unknown.credential]]
name = "u"
[[identity]]
id = "spiffe://example.org/agent"
[[identity.egress]]
name = "same"
to = ["10.0.0.1"]
action = "allow"
[[identity.credential]]
name = "same"
host = "a.example.com"
header = "x-key"
secret_file = "{secret}"
colour = "red"
[[identity.credential]]
name = ""
[[identity.credential]]
name = "wild"
host = "*.example.com"
header = "x-key"
secret_file = "{secret}"
[[identity.credential]]
name = "addr"
host = "10.0.0.1"
header = "x-key"
secret_file = "{secret}"
[[identity.credential]]
name = "port"
host = "b.example.com:443"
header = "x-key"
secret_file = "{secret}"
[[identity.credential]]
name = "bad-header"
host = "c.example.com"
header = "x key"
secret_file = "relative/key"
prefix = "a\u0001"
[[identity.credential]]
name = "host-header"
host = "d.example.com"
header = "Host"
secret_file = "{secret}"
audience = ["x"]
[[identity.credential]]
name = "jwt"
host = "e.example.com"
kind = "jwt_svid"
header = "x-key"
secret_file = "{secret}"
prefix = "p"
audience = []
[[identity.credential]]
name = "jwt-none"
host = "f.example.com"
kind = "jwt_svid"
[[identity.credential]]
name = "kind"
host = "g.example.com"
kind = "magic"
[[identity.credential]]
name = "filters"
host = "h.example.com"
header = "x-key"
secret_file = "{secret}"
methods = ["GET", "G T", 3]
paths = ["v1", "/a b", "/x?y"]
http = "yes"
[[identity.credential]]
name = "first"
host = "i.example.com"
header = "x-key"
secret_file = "{secret}"
[[identity.credential]]
name = "dup-host"
host = "I.example.com"
header = "x-key"
secret_file = "{secret}"
"#
        );
        assert_errors(
            &text,
            &[
                (
                    1,
                    "unknown key `credential` in [unknown]; expected one of: default, audit, egress",
                ),
                (10, "rule name \"same\" is already used in this block at "),
                (
                    14,
                    "unknown key `colour` in a credential rule; expected one of: name, host, kind, header, secret_file, prefix, audience, token_endpoint, grant, scope, resource, token_audience, client_id, methods, paths, http",
                ),
                (15, "this rule has no `host`"),
                (
                    15,
                    "this credential rule has no `header`; a rule of kind \"header\" (the default) needs the header's name",
                ),
                (15, "this credential rule has no `secret_file`"),
                (16, "a rule's `name` must not be empty"),
                (
                    19,
                    "\"*.example.com\": `host` is one DNS name the workload connects to (like \"api.example.com\"), not a pattern",
                ),
                (24, "\"10.0.0.1\" is not a DNS name: `host` is one DNS name"),
                (
                    29,
                    "\"b.example.com:443\" is not a DNS name: `host` is one DNS name the workload connects to (like \"api.example.com\"), with no address, port or path",
                ),
                (35, "`header` \"x key\" is not an HTTP header name"),
                (
                    36,
                    "`secret_file` \"relative/key\" must be an absolute path",
                ),
                (37, "`prefix` must not hold control characters"),
                (
                    41,
                    "`header` \"Host\" frames the request and cannot carry a credential",
                ),
                (
                    43,
                    "`audience` is a key of credential rules of kind = \"jwt_svid\" or \"oauth\"; this rule's kind is \"header\": it adds `header`",
                ),
                (
                    48,
                    "`header` is a key of credential rules of kind = \"header\"; this rule's kind is \"jwt_svid\": it sets `authorization: Bearer` and the identity's JWT-SVID",
                ),
                (
                    49,
                    "`secret_file` is a key of credential rules of kind = \"header\"; this rule's kind is \"jwt_svid\": it sets `authorization: Bearer` and the identity's JWT-SVID",
                ),
                (
                    50,
                    "`prefix` is a key of credential rules of kind = \"header\"; this rule's kind is \"jwt_svid\": it sets `authorization: Bearer` and the identity's JWT-SVID",
                ),
                (51, "`audience` is empty"),
                (
                    52,
                    "this credential rule has no `audience`; a rule of kind \"jwt_svid\" needs",
                ),
                (
                    59,
                    "`kind` \"magic\" is not one of \"header\", \"jwt_svid\", \"oauth\"",
                ),
                (65, "\"G T\" is not an HTTP method"),
                (65, "a method must be a string, not an integer"),
                (66, "path \"v1\" must start with `/`"),
                (
                    66,
                    "path \"/a b\" has ' '; a path prefix has no spaces, query or fragment",
                ),
                (66, "path \"/x?y\" has '?'"),
                (67, "`http` must be true or false, not a string"),
                (
                    75,
                    "host i.example.com already has a credential rule in this block at ",
                ),
            ],
        );
        // The rest of the block's rules are kept apart from its problems:
        // a block without them parses.
        assert_errors(
            "[[identity]]\nid = \"spiffe://e.org/a\"\ncredential = 1\n",
            &[(
                3,
                "`credential` must be an array of tables ([[identity.credential]]), not an integer",
            )],
        );
    }
}
