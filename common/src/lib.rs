//! The kernel/user boundary of idgate: every map name, size, key and value
//! that the eBPF programs and the agent share is defined here, once.
//!
//! # How a decision is looked up
//!
//! 1. [`maps::IDENTITIES`]: socket cgroup id (`u64`) -> identity slot (`u32`).
//!    A cgroup that is not there is judged as [`UNKNOWN_SLOT`].
//! 2. [`maps::SLOT_STATE`]: slot -> [`slot_state`] flags. A revoked slot is
//!    denied outright; this map is not part of a policy generation, so a
//!    revocation survives reloads.
//! 3. [`maps::GENERATION`]: the active policy generation (0 or 1). The
//!    program reads it once and uses it for every lookup below, so one
//!    decision never mixes two rule sets.
//! 4. [`maps::SLOT_POLICY`]: `gen * MAX_SLOTS + slot` -> [`SlotPolicy`]. An
//!    all-zero entry (no [`slot_policy::PRESENT`] flag) means the active
//!    generation has no policy for the slot: deny.
//! 5. [`maps::DEST_V4`] / [`maps::DEST_V6`]: LPM tries keyed by
//!    `(gen, slot, address prefix)` -> [`DestTables`], one port table per
//!    protocol. An IPv4-mapped IPv6 destination is looked up in `DEST_V4`.
//! 6. [`maps::PORTS`]: LPM trie keyed by `(gen, table, port prefix)` ->
//!    [`RuleVerdict`]. User space has already folded less specific prefixes
//!    into each table and split overlapping port ranges into disjoint
//!    blocks, so the longest match is the answer.
//!
//! A miss in steps 5 or 6 falls to the slot's default verdict.
#![no_std]

/// Names of the maps, as they appear in the object file and under the pin
/// directory.
pub mod maps {
    pub const IDENTITIES: &str = "IDG_IDENTITIES";
    pub const SLOT_STATE: &str = "IDG_SLOT_STATE";
    pub const GENERATION: &str = "IDG_GENERATION";
    pub const SLOT_POLICY: &str = "IDG_SLOT_POLICY";
    pub const DEST_V4: &str = "IDG_DEST_V4";
    pub const DEST_V6: &str = "IDG_DEST_V6";
    pub const PORTS: &str = "IDG_PORTS";
    /// User-side record of which identity holds each slot (SHA-256 of the
    /// SPIFFE ID, all zero when free), pinned so that a restarted agent
    /// keeps every slot number and no binding points at the wrong policy.
    pub const SLOT_IDS: &str = "IDG_SLOT_IDS";

    /// Every map, for pinning, adoption and uninstall.
    pub const ALL: [&str; 8] = [
        IDENTITIES,
        SLOT_STATE,
        GENERATION,
        SLOT_POLICY,
        DEST_V4,
        DEST_V6,
        PORTS,
        SLOT_IDS,
    ];
}

/// Names of the programs (their function names in the eBPF crate).
pub mod programs {
    pub const CONNECT4: &str = "idgate_connect4";
    pub const CONNECT6: &str = "idgate_connect6";
    pub const SENDMSG4: &str = "idgate_sendmsg4";
    pub const SENDMSG6: &str = "idgate_sendmsg6";

    /// Every socket hook program.
    pub const ALL: [&str; 4] = [CONNECT4, CONNECT6, SENDMSG4, SENDMSG6];
}

/// Number of identity slots, [`UNKNOWN_SLOT`] included.
pub const MAX_SLOTS: u32 = 65_536;
/// Cgroups that can hold an identity at once.
pub const MAX_BOUND_CGROUPS: u32 = 65_536;
/// Policy generations kept in the maps: the active one and the next.
pub const GENERATIONS: u32 = 2;
/// Address-prefix entries per family, over both generations.
pub const MAX_DEST_ENTRIES: u32 = 524_288;
/// Port-block entries, over both generations.
pub const MAX_PORT_ENTRIES: u32 = 1_048_576;

/// The slot of every cgroup in the scope that has no identity: the
/// unknown-workload policy is compiled into this slot.
pub const UNKNOWN_SLOT: u32 = 0;

/// Port table id meaning "no table": the slot default decides.
pub const NO_TABLE: u32 = 0;

/// What a rule or default says. Numbered as the cgroup sock_addr hooks
/// return: 0 denies (EPERM), 1 allows.
pub mod verdict {
    pub const DENY: u32 = 0;
    pub const ALLOW: u32 = 1;
}

/// Flags in [`maps::SLOT_STATE`].
pub mod slot_state {
    /// Every connect of every cgroup bound to the slot is denied.
    pub const REVOKED: u32 = 1;
}

/// Flags in [`SlotPolicy::flags`].
pub mod slot_policy {
    /// The entry holds a policy (an all-zero entry is "no policy": deny).
    pub const PRESENT: u32 = 1;
    /// Denials are reported but let through.
    pub const AUDIT: u32 = 2;
}

/// Per-slot policy of one generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotPolicy {
    /// [`verdict`] when no rule matches.
    pub default_verdict: u32,
    /// Rule id reported for a default decision.
    pub default_rule: u32,
    /// [`slot_policy`] flags.
    pub flags: u32,
}

/// Index of a slot's policy in [`maps::SLOT_POLICY`].
#[inline(always)]
pub const fn slot_policy_index(generation: u32, slot: u32) -> u32 {
    (generation & 1) * MAX_SLOTS + (slot % MAX_SLOTS)
}

/// LPM data of [`maps::DEST_V4`]. The first [`DEST_FIXED_BITS`] bits are
/// always matched in full.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DestV4 {
    pub generation: u32,
    pub slot: u32,
    /// Address bytes in network order.
    pub addr: [u8; 4],
}

/// LPM data of [`maps::DEST_V6`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DestV6 {
    pub generation: u32,
    pub slot: u32,
    /// Address bytes in network order.
    pub addr: [u8; 16],
}

/// Bits of a destination key before the address: generation and slot.
pub const DEST_FIXED_BITS: u32 = 64;

/// Value of the destination tries: the port table for each protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DestTables {
    /// Table for TCP (and MPTCP) sockets, or [`NO_TABLE`].
    pub tcp: u32,
    /// Table for UDP sockets, or [`NO_TABLE`].
    pub udp: u32,
}

/// LPM data of [`maps::PORTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortKey {
    pub generation: u32,
    pub table: u32,
    /// Port in network order.
    pub port: [u8; 2],
    /// Always zero; beyond every prefix.
    pub _pad: [u8; 2],
}

/// Bits of a port key before the port: generation and table.
pub const PORT_FIXED_BITS: u32 = 64;

/// Value of [`maps::PORTS`]: what the matching rule says.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleVerdict {
    pub verdict: u32,
    pub rule_id: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is `repr(C)`, made of integers and byte arrays with
    // no implicit padding, so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::SlotPolicy {}
    unsafe impl aya::Pod for super::DestV4 {}
    unsafe impl aya::Pod for super::DestV6 {}
    unsafe impl aya::Pod for super::DestTables {}
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::RuleVerdict {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn records_have_no_implicit_padding() {
        assert_eq!(size_of::<SlotPolicy>(), 12);
        assert_eq!(size_of::<DestV4>(), 12);
        assert_eq!(size_of::<DestV6>(), 24);
        assert_eq!(size_of::<DestTables>(), 8);
        assert_eq!(size_of::<PortKey>(), 12);
        assert_eq!(size_of::<RuleVerdict>(), 8);
    }

    #[test]
    fn slot_policy_index_separates_generations() {
        assert_eq!(slot_policy_index(0, 5), 5);
        assert_eq!(slot_policy_index(1, 5), MAX_SLOTS + 5);
        assert_eq!(slot_policy_index(3, 5), MAX_SLOTS + 5);
        assert!(slot_policy_index(1, MAX_SLOTS - 1) < GENERATIONS * MAX_SLOTS);
    }
}
