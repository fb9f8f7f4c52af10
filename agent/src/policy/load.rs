//! Reading a policy file or directory: every file parsed, the files
//! merged, and the whole checked, with every problem reported at once.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::diagnostic::{Diagnostic, Location, Source};
use super::model::PolicySet;
use super::parse::{FileContents, parse};
use super::segments::{Part, parse_parts};
use super::subject::Subject;
use super::{PolicyError, overlap, secrets, warnings};
use crate::files::FileStamp;
use crate::hashing::{FastMap, TextDigest, text_digest};
use crate::parallel;

/// Reads a policy file, or every `*.toml` file of a directory (in name
/// order, not recursive), and checks it. Fails with every error found in
/// any of the files; a good policy carries its warnings.
pub fn load(path: &Path, trust_domains: &[String]) -> Result<PolicySet, PolicyError> {
    Reader::default().load(path, trust_domains)
}

/// Reads policies as [`load`] does, keeping what each file that parsed
/// cleanly came to: a file whose text has not changed since is not
/// parsed again (its blocks, and their serials, are the same), and in a
/// file that changed only the blocks that changed are (see
/// `segments.rs`).
#[derive(Default)]
pub struct Reader {
    /// By path: what the text last read came to.
    files: FastMap<PathBuf, Read>,
    /// What the overlap checks found clean last time.
    clean: overlap::Clean,
}

/// One file as last read.
struct Read {
    /// What its metadata said just before it was read, when that tells
    /// any later change (see [`FileStamp`]).
    stamp: Option<FileStamp>,
    /// The digest of its text.
    digest: TextDigest,
    contents: FileContents,
    /// The warnings of its contents.
    warnings: Vec<Diagnostic>,
    /// Its parts as parsed apart (none when it was parsed whole).
    parts: Vec<Part>,
}

impl Reader {
    /// [`load`], parsing only the files whose text changed since this
    /// reader last read them.
    pub fn load(
        &mut self,
        path: &Path,
        trust_domains: &[String],
    ) -> Result<PolicySet, PolicyError> {
        let mut diagnostics = Vec::new();
        let mut merged = Merged {
            trust_domains,
            ..Default::default()
        };
        let mut earlier = std::mem::take(&mut self.files);
        let files: Vec<(PathBuf, Option<Read>)> = files(path, &mut diagnostics)
            .into_iter()
            .map(|f| {
                let read = earlier.remove(&f);
                (f, read)
            })
            .collect();
        let mut kept = FastMap::default();
        for (file, outcome) in parallel::map(files, |(file, earlier), text: &mut String| {
            let outcome = read_file(&file, earlier, text);
            (file, outcome)
        }) {
            match outcome {
                FileRead::Clean(read) => {
                    merged.add(read.contents.clone(), &mut diagnostics);
                    kept.insert(file, read);
                }
                FileRead::Faulty(contents, problems) => {
                    diagnostics.extend(problems);
                    merged.add(contents, &mut diagnostics);
                }
                FileRead::Unreadable(problem) => diagnostics.push(problem),
            }
        }
        let mut set = merged.finish(&mut diagnostics);
        secrets::check(&set, &mut diagnostics);
        overlap::check(&set, &mut self.clean, &mut diagnostics);
        if diagnostics.is_empty() {
            // Every file read cleanly, and each is kept.
            set.warnings = kept.values().flat_map(|r| r.warnings.clone()).collect();
            self.files = kept;
            sort(&mut set.warnings);
            return Ok(set);
        }
        self.files = kept;
        sort(&mut diagnostics);
        Err(PolicyError { diagnostics })
    }
}

/// What reading one policy file came to.
enum FileRead {
    /// Parsed cleanly (or taken whole from its earlier read).
    Clean(Read),
    /// Parsed with problems: what it holds still goes into the merge, so
    /// every problem of every file is reported at once.
    Faulty(FileContents, Vec<Diagnostic>),
    Unreadable(Diagnostic),
}

/// Reads and parses `file`, taking from `earlier` (its last clean read)
/// what did not change; `text` is a buffer to read into.
fn read_file(file: &Path, earlier: Option<Read>, text: &mut String) -> FileRead {
    let unreadable = |e: std::io::Error| {
        FileRead::Unreadable(Diagnostic::whole_file(
            file,
            format!("cannot read this policy file: {e}"),
        ))
    };
    // The stamp of the open file (an open makes network file systems
    // check their cached attributes).
    let mut opened = match std::fs::File::open(file) {
        Ok(f) => f,
        Err(e) => return unreadable(e),
    };
    let stamp = opened.metadata().ok().and_then(|m| FileStamp::settled(&m));
    let earlier = match earlier {
        Some(read) if stamp.is_some() && read.stamp == stamp => return FileRead::Clean(read),
        earlier => earlier,
    };
    text.clear();
    if let Err(e) = opened.read_to_string(text) {
        return unreadable(e);
    }
    let digest = text_digest(text.as_bytes());
    let earlier = match earlier {
        Some(read) if read.digest == digest => return FileRead::Clean(Read { stamp, ..read }),
        earlier => earlier,
    };
    let earlier_parts = earlier.as_ref().map_or(&[][..], |r| &r.parts);
    if let Some((contents, parts)) = parse_parts(file, text, earlier_parts) {
        return FileRead::Clean(Read {
            stamp,
            digest,
            warnings: warnings::check(&contents),
            contents,
            parts,
        });
    }
    let mut problems = Vec::new();
    let mut contents = parse(&Source::new(file, text.clone()), &mut problems);
    if !problems.is_empty() {
        return FileRead::Faulty(contents, problems);
    }
    if let Some(earlier) = &earlier {
        keep_unchanged(&mut contents, &earlier.contents);
    }
    FileRead::Clean(Read {
        stamp,
        digest,
        warnings: warnings::check(&contents),
        contents,
        parts: Vec::new(),
    })
}

/// Puts back the blocks of an earlier parse of the same file that say the
/// same in the same place, so that only the blocks that changed are new
/// parses (and compiled and checked again).
fn keep_unchanged(contents: &mut FileContents, earlier: &FileContents) {
    let by_subject: FastMap<_, _> = earlier.identities.iter().map(|b| (&b.subject, b)).collect();
    for block in &mut contents.identities {
        if let Some(same) = by_subject.get(&block.subject).filter(|e| e.same_as(block)) {
            *block = Arc::clone(same);
        }
    }
}

/// By file, then line and column.
fn sort(diagnostics: &mut [Diagnostic]) {
    diagnostics.sort_by(|a, b| (&a.file, a.position).cmp(&(&b.file, b.position)));
}

/// The files of a policy path.
fn files(path: &Path, diagnostics: &mut Vec<Diagnostic>) -> Vec<PathBuf> {
    if !path.is_dir() {
        return vec![path.to_owned()];
    }
    let entries = std::fs::read_dir(path).and_then(|entries| {
        entries
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<Vec<_>, _>>()
    });
    match entries {
        Ok(mut files) => {
            files.retain(|p| p.extension().is_some_and(|e| e == "toml") && !p.is_dir());
            files.sort();
            files
        }
        Err(e) => {
            diagnostics.push(Diagnostic::whole_file(
                path,
                format!("cannot list this policy directory: {e}"),
            ));
            Vec::new()
        }
    }
}

/// The files read so far, merged: `mode` and `[unknown]` may each be set
/// in one file only, and each identity or pattern has one block.
#[derive(Default)]
struct Merged<'t> {
    trust_domains: &'t [String],
    set: PolicySet,
    mode_at: Option<Location>,
    unknown_at: Option<Location>,
}

impl Merged<'_> {
    fn add(&mut self, contents: FileContents, diagnostics: &mut Vec<Diagnostic>) {
        if let Some((mode, at)) = contents.mode {
            match &self.mode_at {
                Some(first) => diagnostics.push(Diagnostic::at(
                    &at,
                    format!("`mode` is already set at {first}; set it in one file only"),
                )),
                None => {
                    self.set.mode = mode;
                    self.mode_at = Some(at);
                }
            }
        }
        if let Some((unknown, at)) = contents.unknown {
            match &self.unknown_at {
                Some(first) => diagnostics.push(Diagnostic::at(
                    &at,
                    format!("[unknown] is already defined at {first}; define it in one file only"),
                )),
                None => {
                    self.set.unknown = unknown;
                    self.unknown_at = Some(at);
                }
            }
        }
        for block in contents.identities {
            let td = block.subject.trust_domain();
            if !self.trust_domains.is_empty() && !self.trust_domains.iter().any(|t| t == td) {
                diagnostics.push(Diagnostic::at(
                    &block.at,
                    format!(
                        "trust domain {td:?} of {} is not one this agent is configured for ({}); fix the ID or add the domain to `trust_domains` in the agent's configuration",
                        block.subject,
                        self.trust_domains.join(", ")
                    ),
                ));
                continue;
            }
            self.set.identities.push(block);
        }
    }

    /// The merged policy, each identity or pattern with its first block
    /// only: every later one is reported (checked once over every file,
    /// without copying a subject).
    fn finish(mut self, diagnostics: &mut Vec<Diagnostic>) -> PolicySet {
        let blocks = &self.set.identities;
        let mut first: FastMap<&Subject, &Location> =
            FastMap::with_capacity_and_hasher(blocks.len(), Default::default());
        let mut later = Vec::new();
        for (i, block) in blocks.iter().enumerate() {
            if let Some(at) = first.get(&block.subject) {
                diagnostics.push(Diagnostic::at(
                    &block.at,
                    format!(
                        "{} already has a block at {at}; merge the two blocks into one",
                        block.subject
                    ),
                ));
                later.push(i);
            } else {
                first.insert(&block.subject, &block.at);
            }
        }
        for i in later.into_iter().rev() {
            self.set.identities.remove(i);
        }
        self.set
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::{Action, Mode};
    use crate::policy::testing::PolicyDir;

    const WEB: &str = "[[identity]]\nid = \"spiffe://example.org/web\"\n";
    const AGENTS: &str = "[[identity]]\nid = \"spiffe://example.org/agents/*\"\n";

    /// (file name, line, message) of each problem.
    fn problems(e: &PolicyError) -> Vec<(String, Option<u32>, String)> {
        e.diagnostics
            .iter()
            .map(|d| {
                let name = d.file.file_name().unwrap().to_string_lossy().into_owned();
                (name, d.position.map(|p| p.0), d.message.clone())
            })
            .collect()
    }

    #[test]
    fn merges_the_toml_files_of_a_directory_in_name_order() {
        let dir = PolicyDir::new(&[
            ("20-web.toml", WEB),
            (
                "10-global.toml",
                "mode = \"audit\"\n[unknown]\ndefault = \"allow\"\n",
            ),
            ("30-agents.toml", AGENTS),
            ("notes.txt", "not a policy"),
        ]);
        std::fs::create_dir(dir.file("old.toml")).unwrap();
        let p = dir.load(&["example.org"]).unwrap();
        assert_eq!(p.mode, Mode::Audit);
        assert!(p.unknown.default.is_some());
        let ids: Vec<String> = p.identities.iter().map(|b| b.subject.to_string()).collect();
        assert_eq!(
            ids,
            ["spiffe://example.org/web", "spiffe://example.org/agents/*"]
        );
        assert_eq!(p.identities[1].at.file, dir.file("30-agents.toml").into());
        // One file is a policy too.
        let one = load(&dir.file("20-web.toml"), &[]).unwrap();
        assert_eq!(one.identities.len(), 1);
        assert_eq!(one.mode, Mode::Enforce);
    }

    #[test]
    fn settings_and_blocks_are_defined_once_across_files() {
        let dir = PolicyDir::new(&[
            (
                "a.toml",
                &format!("mode = \"audit\"\n[unknown]\n{WEB}{AGENTS}"),
            ),
            (
                "b.toml",
                &format!("mode = \"enforce\"\n[unknown]\n{AGENTS}{WEB}{WEB}"),
            ),
        ]);
        let e = dir.load(&[]).unwrap_err();
        let got = problems(&e);
        let want = [
            ("b.toml", 1, "`mode` is already set at "),
            ("b.toml", 2, "[unknown] is already defined at "),
            (
                "b.toml",
                4,
                "spiffe://example.org/agents/* already has a block at ",
            ),
            (
                "b.toml",
                6,
                "spiffe://example.org/web already has a block at ",
            ),
            (
                "b.toml",
                8,
                "spiffe://example.org/web already has a block at ",
            ),
        ];
        assert_eq!(got.len(), want.len(), "{got:#?}");
        for ((file, line, message), (want_file, want_line, part)) in got.iter().zip(want) {
            assert_eq!(
                (file.as_str(), *line),
                (want_file, Some(want_line)),
                "{message}"
            );
            assert!(message.starts_with(part), "{message}");
            assert!(message.contains("a.toml:"), "{message}");
        }
    }

    #[test]
    fn identities_must_be_in_a_configured_trust_domain() {
        let dir = PolicyDir::new(&[(
            "p.toml",
            "[[identity]]\nid = \"spiffe://example.org/web\"\n[[identity]]\nid = \"spiffe://evil.org/*\"\n[[identity]]\nid = \"spiffe://other.org/x\"\n",
        )]);
        let e = dir.load(&["example.org", "other.org"]).unwrap_err();
        let got = problems(&e);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].1, Some(4));
        assert_eq!(
            got[0].2,
            "trust domain \"evil.org\" of spiffe://evil.org/* is not one this agent is configured for (example.org, other.org); fix the ID or add the domain to `trust_domains` in the agent's configuration"
        );
        // No configured trust domain: any.
        assert_eq!(dir.load(&[]).unwrap().identities.len(), 3);
    }

    #[test]
    fn reports_unreadable_files_with_the_problems_of_the_others() {
        let dir = PolicyDir::new(&[("a.toml", "colour = 1\n"), ("b.toml", "")]);
        std::fs::write(dir.file("b.toml"), [0xff, 0xfe]).unwrap();
        let e = dir.load(&[]).unwrap_err();
        let got = problems(&e);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!((got[0].0.as_str(), got[0].1), ("a.toml", Some(1)));
        assert_eq!((got[1].0.as_str(), got[1].1), ("b.toml", None));
        assert!(
            got[1].2.starts_with("cannot read this policy file: "),
            "{}",
            got[1].2
        );
        let text = e.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "invalid policy (2 errors):");
        assert!(lines[1].ends_with("a.toml:1:1: error: unknown key `colour` in a policy file; expected one of: mode, unknown, identity"), "{text}");
        assert!(
            lines[2].ends_with(
                "b.toml: error: cannot read this policy file: stream did not contain valid UTF-8"
            ),
            "{text}"
        );
        let missing = load(&dir.file("none.toml"), &[]).unwrap_err();
        assert!(
            missing
                .to_string()
                .starts_with("invalid policy (1 error):\n")
        );
        assert!(
            missing
                .to_string()
                .contains("none.toml: error: cannot read this policy file: No such file")
        );
    }

    #[test]
    fn a_reader_parses_again_only_the_files_whose_text_changed() {
        let dir = PolicyDir::new(&[("1.toml", WEB), ("2.toml", AGENTS)]);
        let mut reader = Reader::default();
        let serials = |p: &PolicySet| -> Vec<_> { p.identities.iter().map(|b| b.serial).collect() };
        let first = serials(&reader.load(&dir.path, &[]).unwrap());
        assert_eq!(serials(&reader.load(&dir.path, &[]).unwrap()), first);
        std::fs::write(dir.file("2.toml"), format!("{AGENTS}default = \"allow\"\n")).unwrap();
        let changed = reader.load(&dir.path, &[]).unwrap();
        assert_eq!(serials(&changed)[0], first[0]);
        assert_ne!(serials(&changed)[1], first[1]);
        // In a file that changed, a block that says the same in the same
        // place stays the same parse.
        std::fs::write(
            dir.file("2.toml"),
            format!("{AGENTS}default = \"allow\"\n{}", WEB.replace("web", "db")),
        )
        .unwrap();
        let added = reader.load(&dir.path, &[]).unwrap();
        assert_eq!(serials(&added)[..2], serials(&changed)[..]);
        assert_eq!(added.identities.len(), 3);
        assert_eq!(changed.identities[1].policy.default, Some(Action::Allow));
        // A file that does not parse is refused every time, not kept.
        std::fs::write(dir.file("1.toml"), "[[identity]]\nid = 3\n").unwrap();
        assert!(reader.load(&dir.path, &[]).is_err());
        assert!(reader.load(&dir.path, &[]).is_err());
        // Another reader parses everything itself: new serials.
        std::fs::write(dir.file("1.toml"), WEB).unwrap();
        let again = serials(&reader.load(&dir.path, &[]).unwrap());
        assert_ne!(again[0], first[0]);
        assert_eq!(again[1], serials(&changed)[1]);
        assert!(
            serials(&load(&dir.path, &[]).unwrap())
                .iter()
                .all(|s| !again.contains(s))
        );
    }

    #[test]
    fn a_settled_file_is_not_read_again_and_any_write_to_it_is_seen() {
        let dir = PolicyDir::new(&[("1.toml", WEB)]);
        let mut reader = Reader::default();
        let subjects = |p: &PolicySet| -> Vec<String> {
            p.identities.iter().map(|b| b.subject.to_string()).collect()
        };
        // Written just now: not settled, so read (and parsed) again each
        // time it changes, however fast.
        std::fs::write(dir.file("1.toml"), WEB.replace("web", "wab")).unwrap();
        assert_eq!(
            subjects(&reader.load(&dir.path, &[]).unwrap()),
            ["spiffe://example.org/wab"]
        );
        std::thread::sleep(crate::files::SETTLED + std::time::Duration::from_millis(100));
        let settled = reader.load(&dir.path, &[]).unwrap();
        assert!(reader.files.values().all(|r| r.stamp.is_some()));
        // Kept by its stamp: the same parse.
        let again = reader.load(&dir.path, &[]).unwrap();
        assert_eq!(again.identities[0].serial, settled.identities[0].serial);
        // A write of the same size, at once, is read.
        std::fs::write(dir.file("1.toml"), WEB.replace("web", "wob")).unwrap();
        assert_eq!(
            subjects(&reader.load(&dir.path, &[]).unwrap()),
            ["spiffe://example.org/wob"]
        );
        // And so is a file replaced by a rename.
        let next = dir.file("next");
        std::fs::write(&next, WEB.replace("web", "wib")).unwrap();
        std::fs::rename(&next, dir.file("1.toml")).unwrap();
        assert_eq!(
            subjects(&reader.load(&dir.path, &[]).unwrap()),
            ["spiffe://example.org/wib"]
        );
    }

    #[test]
    fn a_reader_checks_again_a_block_whose_context_changed() {
        let rule = |name: &str, to: &str, action: &str| {
            format!(
                "[[identity.egress]]\nname = \"{name}\"\nto = [{to}]\nports = [80]\nprotocol = \"tcp\"\naction = \"{action}\"\n"
            )
        };
        let exact = format!(
            "[[identity]]\nid = \"spiffe://example.org/agents/a\"\n{}",
            rule("wide", "\"10.0.0.0/8\"", "allow")
        );
        let dir = PolicyDir::new(&[("1.toml", AGENTS), ("2.toml", &exact)]);
        let mut reader = Reader::default();
        reader.load(&dir.path, &[]).unwrap();
        // The exact block's file is the same, but the pattern over it now
        // decides everything its rule covers.
        std::fs::write(
            dir.file("1.toml"),
            format!(
                "{AGENTS}{}",
                rule("halves", "\"10.0.0.0/9\", \"10.128.0.0/9\"", "deny")
            ),
        )
        .unwrap();
        let e = reader.load(&dir.path, &[]).unwrap_err();
        let found = problems(&e);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0, "2.toml");
        assert!(
            found[0].2.contains("rule \"wide\" can never match"),
            "{found:?}"
        );
    }
}
