//! What a reload changes: identities and rules added, removed, changed.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::model::{Action, IdentityPolicy, Keyword, PolicySet, Serial};
use super::summary::{describe_credential, describe_rule};
use crate::hashing::FastSet;

/// The difference between two policies. Rules are named `OWNER: NAME`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyDiff {
    pub mode_changed: bool,
    pub identities_added: Vec<String>,
    pub identities_removed: Vec<String>,
    /// Identities whose `default`, `audit` or `raw_sockets` changed.
    pub identities_changed: Vec<String>,
    pub rules_added: Vec<String>,
    pub rules_removed: Vec<String>,
    pub rules_changed: Vec<String>,
}

/// Owner -> (settings, rule name -> rule description).
type Flat = BTreeMap<String, (String, BTreeMap<String, String>)>;

/// A block's settings as one text: what `default`, `audit` and
/// `raw_sockets` say (unset ones as `-`).
fn settings_text(p: &IdentityPolicy) -> String {
    let or_unset = |v: Option<&str>| v.unwrap_or("-").to_owned();
    format!(
        "default {}, audit {}, raw_sockets {}",
        or_unset(p.default.map(|a| a.word())),
        or_unset(p.audit.map(|a| if a { "true" } else { "false" })),
        or_unset(p.raw_sockets.map(|r| if r { "true" } else { "false" })),
    )
}

/// Every block of `policy` but those in `same` (parsed once, so
/// unchanged: see [`Serial`]).
fn flatten(policy: &PolicySet, same: &FastSet<Serial>) -> Flat {
    let one = |p: &IdentityPolicy| {
        let egress = p.egress.iter().map(|r| (r.name.clone(), describe_rule(r)));
        let credentials = p
            .credentials
            .iter()
            .map(|r| (r.name.clone(), describe_credential(r)));
        let rules = egress.chain(credentials).collect();
        (settings_text(p), rules)
    };
    let mut flat = Flat::new();
    flat.insert("unknown".into(), one(&policy.unknown));
    for block in policy
        .identities
        .iter()
        .filter(|b| !same.contains(&b.serial))
    {
        flat.insert(block.subject.to_string(), one(&block.policy));
    }
    flat
}

/// The blocks both policies have from one parse.
fn same_blocks(old: &PolicySet, new: &PolicySet) -> FastSet<Serial> {
    let old: FastSet<Serial> = old.identities.iter().map(|b| b.serial).collect();
    new.identities
        .iter()
        .map(|b| b.serial)
        .filter(|s| old.contains(s))
        .collect()
}

/// What changes from `old` to `new`.
pub fn diff(old: &PolicySet, new: &PolicySet) -> PolicyDiff {
    let same = same_blocks(old, new);
    let (old_flat, new_flat) = (flatten(old, &same), flatten(new, &same));
    let mut d = PolicyDiff {
        mode_changed: old.mode != new.mode,
        ..Default::default()
    };
    let empty = (String::new(), BTreeMap::new());
    for (owner, (settings, rules)) in &new_flat {
        let (old_settings, old_rules) = match old_flat.get(owner) {
            Some(o) => o,
            None => {
                d.identities_added.push(owner.clone());
                &empty
            }
        };
        if old_flat.contains_key(owner) && settings != old_settings {
            d.identities_changed.push(owner.clone());
        }
        for (name, text) in rules {
            match old_rules.get(name) {
                None => d.rules_added.push(format!("{owner}: {name}")),
                Some(old) if old != text => d.rules_changed.push(format!("{owner}: {name}")),
                Some(_) => {}
            }
        }
        for name in old_rules.keys().filter(|n| !rules.contains_key(*n)) {
            d.rules_removed.push(format!("{owner}: {name}"));
        }
    }
    for (owner, (_, rules)) in &old_flat {
        if !new_flat.contains_key(owner) {
            d.identities_removed.push(owner.clone());
            d.rules_removed
                .extend(rules.keys().map(|n| format!("{owner}: {n}")));
        }
    }
    d
}

/// What a change does to one block's identities: the rules it adds, takes
/// away or rewrites, each with what that opens or closes, and its
/// settings before and after.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockChange {
    /// The block's identity (or pattern, or `unknown`).
    pub owner: String,
    /// `(old, new)` settings text, when they differ.
    pub settings: Option<(String, String)>,
    /// `(effect, rule name, description)`.
    pub rules: Vec<(Effect, String, String)>,
}

/// What one rule's change does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// An allow added, or a deny taken away.
    Opens,
    /// A deny added, or an allow taken away.
    Closes,
    /// A rule of the same name says something else (old -> new).
    Changes,
}

impl Effect {
    fn word(self) -> &'static str {
        match self {
            Self::Opens => "opens",
            Self::Closes => "closes",
            Self::Changes => "changes",
        }
    }
}

/// What changes from `old` to `new`, per block, for the blocks that
/// change (a block new or gone has every rule opened or closed).
pub fn by_block(old: &PolicySet, new: &PolicySet) -> Vec<BlockChange> {
    let same = same_blocks(old, new);
    let (old_flat, new_flat) = (flatten(old, &same), flatten(new, &same));
    let empty = (String::new(), BTreeMap::new());
    let owners: std::collections::BTreeSet<&String> =
        old_flat.keys().chain(new_flat.keys()).collect();
    let is_deny = |text: &str| text.starts_with(Action::Deny.word());
    let mut out = Vec::new();
    for owner in owners {
        let (before, after) = (
            old_flat.get(owner).unwrap_or(&empty),
            new_flat.get(owner).unwrap_or(&empty),
        );
        let mut change = BlockChange {
            owner: owner.clone(),
            settings: (before.0 != after.0).then(|| (or_none(&before.0), or_none(&after.0))),
            rules: Vec::new(),
        };
        for (name, text) in &after.1 {
            match before.1.get(name) {
                None => {
                    let effect = if is_deny(text) {
                        Effect::Closes
                    } else {
                        Effect::Opens
                    };
                    change.rules.push((effect, name.clone(), text.clone()));
                }
                Some(old) if old != text => {
                    change
                        .rules
                        .push((Effect::Changes, name.clone(), format!("{old} -> {text}")));
                }
                Some(_) => {}
            }
        }
        for (name, text) in before.1.iter().filter(|(n, _)| !after.1.contains_key(*n)) {
            let effect = if is_deny(text) {
                Effect::Opens
            } else {
                Effect::Closes
            };
            change.rules.push((effect, name.clone(), text.clone()));
        }
        if change.settings.is_some() || !change.rules.is_empty() {
            out.push(change);
        }
    }
    out
}

/// A block's settings text, or that there is no such block.
fn or_none(settings: &str) -> String {
    if settings.is_empty() {
        "(no block)".to_owned()
    } else {
        settings.to_owned()
    }
}

impl fmt::Display for BlockChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.owner)?;
        if let Some((old, new)) = &self.settings {
            write!(f, "\n  settings {old} -> {new}")?;
        }
        for (effect, name, text) in &self.rules {
            write!(f, "\n  {:<7} {text} (rule {name})", effect.word())?;
        }
        Ok(())
    }
}

impl fmt::Display for PolicyDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "identities +{} -{} ~{}; rules +{} -{} ~{}{}",
            self.identities_added.len(),
            self.identities_removed.len(),
            self.identities_changed.len(),
            self.rules_added.len(),
            self.rules_removed.len(),
            self.rules_changed.len(),
            if self.mode_changed {
                "; mode changed"
            } else {
                ""
            }
        )?;
        for (sign, list) in [
            ("+", &self.identities_added),
            ("-", &self.identities_removed),
            ("~", &self.identities_changed),
        ] {
            for id in list {
                write!(f, "\n  {sign} identity {id}")?;
            }
        }
        for (sign, list) in [
            ("+", &self.rules_added),
            ("-", &self.rules_removed),
            ("~", &self.rules_changed),
        ] {
            for rule in list {
                write!(f, "\n  {sign} rule {rule}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testing::policy;

    const WEB: &str = "[[identity]]\nid = \"spiffe://example.org/web\"\n";
    const DB: &str = "[[identity]]\nid = \"spiffe://example.org/db\"\n";

    fn rule(name: &str, port: u16) -> String {
        format!(
            "[[identity.egress]]\nname = \"{name}\"\nto = [\"any\"]\nports = [{port}]\nprotocol = \"tcp\"\naction = \"allow\"\n"
        )
    }

    #[test]
    fn names_what_changed() {
        let old = policy(&format!("{WEB}{}{}", rule("a", 1), rule("b", 2)));
        let new = policy(&format!(
            "{DB}{WEB}{}{}{}",
            rule("a", 1),
            rule("b", 3),
            rule("c", 4)
        ));
        let d = diff(&old, &new);
        assert_eq!(d.identities_added, vec!["spiffe://example.org/db"]);
        assert_eq!(d.rules_added, vec!["spiffe://example.org/web: c"]);
        assert_eq!(d.rules_changed, vec!["spiffe://example.org/web: b"]);
        assert!(d.rules_removed.is_empty() && !d.mode_changed);
        let back = diff(&new, &old);
        assert_eq!(back.identities_removed, vec!["spiffe://example.org/db"]);
        assert_eq!(back.rules_removed, vec!["spiffe://example.org/web: c"]);
        assert_eq!(diff(&old, &old), PolicyDiff::default());
        assert!(
            d.to_string()
                .starts_with("identities +1 -0 ~0; rules +1 -0 ~1")
        );
        let audited = policy(&format!("mode = \"audit\"\n{WEB}default = \"allow\"\n"));
        let d = diff(&old, &audited);
        assert!(d.mode_changed);
        assert_eq!(d.identities_changed, vec!["spiffe://example.org/web"]);
    }

    #[test]
    fn by_block_says_what_each_change_opens_and_closes() {
        let deny =
            "[[identity.egress]]\nname = \"meta\"\nto = [\"169.254.169.254\"]\naction = \"deny\"\n";
        let old = policy(&format!(
            "{WEB}{}{}{DB}{}",
            rule("a", 1),
            rule("b", 2),
            rule("x", 5)
        ));
        let new = policy(&format!(
            "{WEB}default = \"deny\"\n{}{}{deny}",
            rule("b", 3),
            rule("c", 4)
        ));
        let changes = by_block(&old, &new);
        let owners: Vec<&str> = changes.iter().map(|c| c.owner.as_str()).collect();
        assert_eq!(
            owners,
            ["spiffe://example.org/db", "spiffe://example.org/web"]
        );
        let db = &changes[0];
        assert_eq!(db.rules.len(), 1);
        assert_eq!(db.rules[0].0, Effect::Closes);
        assert!(db.settings.as_ref().unwrap().1.contains("no block"));
        let web = &changes[1];
        let effects: Vec<(Effect, &str)> =
            web.rules.iter().map(|(e, n, _)| (*e, n.as_str())).collect();
        assert_eq!(
            effects,
            [
                (Effect::Changes, "b"),
                (Effect::Opens, "c"),
                (Effect::Closes, "meta"),
                (Effect::Closes, "a"),
            ]
        );
        assert_eq!(
            web.settings,
            Some((
                "default -, audit -, raw_sockets -".into(),
                "default deny, audit -, raw_sockets -".into()
            ))
        );
        let text = web.to_string();
        assert!(
            text.contains("  opens   allow tcp to any port 4 (rule c)"),
            "{text}"
        );
        assert!(by_block(&old, &old).is_empty());
        // Taking a deny away opens.
        let back = by_block(&new, &old);
        assert!(
            back[1]
                .rules
                .contains(&(Effect::Opens, "meta".into(), new_meta(&new)))
        );
    }

    fn new_meta(p: &PolicySet) -> String {
        let web = p
            .identities
            .iter()
            .find(|b| b.subject.to_string().ends_with("web"))
            .unwrap();
        describe_rule(web.policy.egress.iter().find(|r| r.name == "meta").unwrap())
    }
}
