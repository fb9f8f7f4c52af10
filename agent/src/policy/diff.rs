//! What a reload changes: identities and rules added, removed, changed.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::model::{IdentityPolicy, PolicySet};
use super::summary::describe_rule;

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

fn flatten(policy: &PolicySet) -> Flat {
    let one = |p: &IdentityPolicy| {
        let settings = format!("{:?}/{:?}/{:?}", p.default, p.audit, p.raw_sockets);
        let rules = p
            .egress
            .iter()
            .map(|r| (r.name.clone(), describe_rule(r)))
            .collect();
        (settings, rules)
    };
    let mut flat = Flat::new();
    flat.insert("unknown".into(), one(&policy.unknown));
    for block in &policy.identities {
        flat.insert(block.subject.to_string(), one(&block.policy));
    }
    flat
}

/// What changes from `old` to `new`.
pub fn diff(old: &PolicySet, new: &PolicySet) -> PolicyDiff {
    let (old_flat, new_flat) = (flatten(old), flatten(new));
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
}
