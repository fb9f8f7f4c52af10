//! Hashing for the agent's own data, where SipHash's cost shows: a reload
//! at 10,000 identities hashes every subject, serial and slot key several
//! times, and reads megabytes of policy text to find what changed.
//!
//! - [`FastMap`] and [`FastSet`] use foldhash. Their keys come from the
//!   operator's files, the kernel and the agent itself, never from the
//!   network, so the flooding resistance SipHash buys is not needed.
//! - [`text_digest`] tells whether a text changed since it was last read:
//!   128-bit xxh3. It guards against accident (two different texts with
//!   one digest is a 2^-128 chance), not against an adversary: whoever
//!   can choose the policy's text already chooses the policy.

use std::collections::{HashMap, HashSet};

/// A hash map with foldhash (see the module's note).
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
/// A hash set with foldhash (see the module's note).
pub type FastSet<T> = HashSet<T, foldhash::fast::RandomState>;

/// What a text is compared by, to know whether it changed.
pub type TextDigest = u128;

/// The digest of `text` (see the module's note).
pub fn text_digest(text: &[u8]) -> TextDigest {
    xxhash_rust::xxh3::xxh3_128(text)
}
