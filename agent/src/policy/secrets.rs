//! The checks of credential rules that read the file system: each secret
//! file is there, is a regular file, and neither its group nor others may
//! read it. Run on every load (a file unchanged since the last load may
//! point at a secret file that changed), so `idgate policy check` and a
//! reload both refuse a policy whose secret file is not fit.

use std::path::Path;

use super::diagnostic::Diagnostic;
use super::model::{CredentialKind, PolicySet};

/// Adds a diagnostic for every credential rule whose secret file is not
/// fit to hold a secret.
pub fn check(policy: &PolicySet, diagnostics: &mut Vec<Diagnostic>) {
    let rules = policy.identities.iter().flat_map(|b| &b.policy.credentials);
    for rule in rules {
        if let CredentialKind::Header { secret_file, .. } = &rule.kind
            && let Err(problem) = fit(secret_file)
        {
            diagnostics.push(Diagnostic::at(
                &rule.at,
                format!(
                    "secret file {} of credential rule {:?}: {problem}",
                    secret_file.display(),
                    rule.name
                ),
            ));
        }
    }
}

/// Why `path` cannot hold a secret, if it cannot.
fn fit(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot be read: {e}"))?;
    crate::files::check_private(&meta).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use crate::policy::Reader;
    use crate::policy::testing::{PolicyDir, errors};

    fn rule(name: &str, secret: &std::path::Path) -> String {
        format!(
            "[[identity.credential]]\nname = \"{name}\"\nhost = \"{name}.example.com\"\nheader = \"x-key\"\nsecret_file = \"{}\"\n",
            secret.display()
        )
    }

    fn chmod(path: &std::path::Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_secret_file_must_be_a_regular_file_of_its_owner_only() {
        let dir = PolicyDir::new(&[("open", "k"), ("group", "k"), ("fine", "k")]);
        chmod(&dir.file("open"), 0o644);
        chmod(&dir.file("group"), 0o640);
        chmod(&dir.file("fine"), 0o600);
        let text = format!(
            "[[identity]]\nid = \"spiffe://e.org/a\"\n{}{}{}{}{}",
            rule("open", &dir.file("open")),
            rule("group", &dir.file("group")),
            rule("missing", &dir.file("missing")),
            rule("dir", &dir.path),
            rule("fine", &dir.file("fine")),
        );
        let got = errors(&text);
        let want = [
            (
                3,
                format!(
                    "secret file {} of credential rule \"open\": has mode 0644: its group or others have access to it; make it its owner's only (chmod 600)",
                    dir.file("open").display(),
                ),
            ),
            (
                8,
                format!(
                    "secret file {} of credential rule \"group\": has mode 0640",
                    dir.file("group").display()
                ),
            ),
            (
                13,
                format!(
                    "secret file {} of credential rule \"missing\": cannot be read: No such file or directory",
                    dir.file("missing").display()
                ),
            ),
            (
                18,
                format!(
                    "secret file {} of credential rule \"dir\": is not a regular file (it is a directory)",
                    dir.path.display()
                ),
            ),
        ];
        assert_eq!(got.len(), want.len(), "{got:#?}");
        for ((line, message), (want_line, part)) in got.iter().zip(&want) {
            assert_eq!(line, want_line, "{message}");
            assert!(message.starts_with(part.as_str()), "{message}");
        }
    }

    /// The policy's text is the same, so its blocks are not parsed again;
    /// the secret file is looked at all the same.
    #[test]
    fn a_reload_looks_at_the_secret_files_again() {
        let secrets = PolicyDir::new(&[("key", "k")]);
        let key = secrets.file("key");
        chmod(&key, 0o600);
        let dir = PolicyDir::new(&[(
            "p.toml",
            &format!(
                "[[identity]]\nid = \"spiffe://e.org/a\"\n{}",
                rule("api", &key)
            ),
        )]);
        let mut reader = Reader::default();
        reader.load(&dir.path, &[]).unwrap();
        chmod(&key, 0o604);
        let e = reader.load(&dir.path, &[]).unwrap_err();
        assert_eq!(e.diagnostics.len(), 1, "{e}");
        assert!(e.diagnostics[0].message.contains("has mode 0604"), "{e}");
        chmod(&key, 0o400);
        reader.load(&dir.path, &[]).unwrap();
    }
}
