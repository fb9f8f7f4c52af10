//! Registration entries indexed by their `cgroup:path` globs, so that
//! attesting a cgroup checks only the entries that can match it. With
//! thousands of entries (one per workload is common) a pass over every
//! cgroup then costs in proportion to the cgroups, not to the cgroups
//! times the entries.

use std::ops::Deref;

use globset::{GlobSet, GlobSetBuilder};

use super::{Entry, Selector};

/// The entries, in their order, and the index.
#[derive(Debug, Clone)]
pub struct EntrySet {
    entries: Vec<Entry>,
    /// The first `cgroup:path` glob of each entry that has one; `None`
    /// when the set could not be built (then every entry is a candidate).
    globs: Option<GlobSet>,
    /// The entry of each glob in `globs`.
    glob_entries: Vec<usize>,
    /// Entries without a `cgroup:path` selector: candidates everywhere.
    everywhere: Vec<usize>,
}

impl EntrySet {
    pub fn new(entries: Vec<Entry>) -> Self {
        let mut builder = GlobSetBuilder::new();
        let mut glob_entries = Vec::new();
        let mut everywhere = Vec::new();
        for (index, entry) in entries.iter().enumerate() {
            let glob = entry.selectors.iter().find_map(|s| match s {
                Selector::CgroupPath(glob) => Some(glob.glob().clone()),
                _ => None,
            });
            match glob {
                Some(glob) => {
                    builder.add(glob);
                    glob_entries.push(index);
                }
                None => everywhere.push(index),
            }
        }
        let globs = match builder.build() {
            Ok(set) => Some(set),
            Err(e) => {
                tracing::warn!(error = %e, "cgroup:path globs not indexed; every entry is checked against every cgroup");
                None
            }
        };
        Self {
            entries,
            globs,
            glob_entries,
            everywhere,
        }
    }

    /// Whether it holds exactly `entries` and then `tail` more entries
    /// (the caller knows those are the same: the agent's configuration,
    /// which does not change while it runs, puts them last in every set).
    pub fn starts_with(&self, entries: &[Entry], tail: usize) -> bool {
        self.entries.len() == entries.len() + tail && self.entries[..entries.len()] == *entries
    }

    /// Whether `other` holds the same entries, in the same order.
    pub fn same_entries(&self, other: &EntrySet) -> bool {
        self.entries == other.entries
    }

    /// Indices, ascending, of the entries that may match a cgroup at
    /// `cgroup_path` (relative to the v2 root): every entry whose
    /// `cgroup:path` selectors could all match it, and every entry with
    /// none. The caller still checks all of an entry's selectors.
    pub fn candidates(&self, cgroup_path: &str) -> Vec<usize> {
        let Some(globs) = &self.globs else {
            return (0..self.entries.len()).collect();
        };
        let mut found: Vec<usize> = globs
            .matches(cgroup_path)
            .into_iter()
            .map(|g| self.glob_entries[g])
            .chain(self.everywhere.iter().copied())
            .collect();
        found.sort_unstable();
        found
    }
}

impl Deref for EntrySet {
    type Target = [Entry];

    fn deref(&self) -> &[Entry] {
        &self.entries
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::identity::entry::parse_entries;

    #[test]
    fn candidates_are_the_entries_whose_cgroup_glob_matches_and_those_without_one() {
        let entries = parse_entries(
            Path::new("entries.toml"),
            r#"
[[entry]]   # 0
id = "spiffe://example.org/a"
selectors = ["cgroup:path:/app.slice/a-*.service", "unix:uid:1000"]
[[entry]]   # 1
id = "spiffe://example.org/b"
selectors = ["unix:uid:0"]
[[entry]]   # 2
id = "spiffe://example.org/c"
selectors = ["cgroup:path:/app.slice/c.service"]
[[entry]]   # 3: two globs; the first one is the index key
id = "spiffe://example.org/d"
selectors = ["cgroup:path:/app.slice/*", "cgroup:path:/app.slice/d.service"]
"#,
        )
        .unwrap();
        let set = EntrySet::new(entries);
        assert_eq!(set.len(), 4);
        assert_eq!(set.candidates("/app.slice/a-1.service"), [0, 1, 3]);
        assert_eq!(set.candidates("/app.slice/c.service"), [1, 2, 3]);
        // `*` does not cross a `/`, as in the selector itself.
        assert_eq!(set.candidates("/app.slice/x/c.service"), [1]);
        assert_eq!(set.candidates("/other.slice/a-1.service"), [1]);
    }

    #[test]
    fn many_literal_entries_give_one_candidate_each() {
        let text: String = (0..500)
            .map(|i| {
                format!(
                    "[[entry]]\nid = \"spiffe://example.org/w{i}\"\nselectors = [\"cgroup:path:/scope/w{i}\"]\n"
                )
            })
            .collect();
        let set = EntrySet::new(parse_entries(Path::new("e.toml"), &text).unwrap());
        assert_eq!(set.candidates("/scope/w499"), [499]);
        assert_eq!(set.candidates("/scope/w500"), Vec::<usize>::new());
    }
}
