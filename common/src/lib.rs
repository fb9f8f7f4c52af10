//! The kernel/user boundary of idgate: every map name, size, key and value
//! that the eBPF programs and the agent share is defined here, once.
//!
//! # How a decision is looked up
//!
//! 1. [`maps::IDENTITIES`]: socket cgroup id (`u64`) -> identity slot (`u32`).
//!    A cgroup that is not there is judged as [`UNKNOWN_SLOT`]. A binding
//!    with an expiry (`idgate run --ttl`, an entry's `ttl`) carries
//!    [`binding::EXPIRES`] and its end in [`maps::BINDING_EXPIRY`]: from
//!    then on (on the boot-time clock) the cgroup is judged as
//!    [`UNKNOWN_SLOT`], as it is once the agent unbinds it. In front
//!    of it, [`maps::IDENTITY_INDEX`] holds most bindings at a place given
//!    by the id (see [`identity_index`]): one array read, no hashing.
//! 2. [`maps::SLOT_STATE`]: slot -> [`slot_state`] flags. A revoked slot is
//!    denied outright; this map is not part of a policy generation, so a
//!    revocation survives reloads.
//! 3. [`maps::GENERATION`]: the active policy generation (0 or 1) in its
//!    lowest bit; the rest counts switches, so the whole value names one
//!    generation (see step 7). The program reads it once and uses it for
//!    every lookup below, so one decision never mixes two rule sets.
//! 4. [`maps::SLOT_POLICY`]: `gen * MAX_SLOTS + slot` -> [`SlotPolicy`]. An
//!    all-zero entry (no [`slot_policy::PRESENT`] flag) means the active
//!    generation has no policy for the slot: deny.
//! 5. [`maps::SLOT_DESTS`]: the same index -> an LPM trie of that slot's
//!    rule set, keyed by [`DestKey`] (address family, address prefix) ->
//!    [`DestTables`], one [`PortTable`] per protocol. An IPv4-mapped IPv6
//!    destination is looked up as IPv4. A rule set without address rules
//!    (names only: [`slot_policy::NO_ADDRESS_RULES`]) skips this lookup.
//!    Each rule set has tries of its own,
//!    as deep as its own rules need, whatever the size of the policy;
//!    slots with the same rule set share them. User space has already
//!    folded less specific prefixes into each port table and split
//!    overlapping port ranges into disjoint ones, so the longest prefix's
//!    table is the whole answer.
//! 6. A port table of up to [`INLINE_RANGES`] ranges is held in the
//!    destination entry itself and scanned there: the common case costs
//!    one trie lookup. A larger one is in [`maps::SLOT_PORTS`]: the same
//!    index -> an LPM trie keyed by [`PortKey`] (table, port prefix) ->
//!    [`RuleVerdict`], where the ranges are split into prefix blocks and
//!    the longest match is the answer.
//!
//! The inner tries are never changed once they are in an outer array:
//! a reload builds new ones for the inactive generation (or reuses the
//! active generation's for rule sets that did not change).
//!
//! 7. Names: when no address rule covers the connect (step 5 or 6 found
//!    nothing, so the default would decide) and the slot is not the
//!    unknown workload's, [`maps::LEARNED`] is read: (slot, family,
//!    address) -> up to [`LEARNED_INLINE`] [`LearnedName`]s, each the
//!    name class a lookup of this slot's learned the address for and its
//!    expiry on the monotonic clock, read as of the last tick
//!    (`bpf_ktime_get_coarse_ns`: a load, where the precise clocks cost
//!    a clock-source read on every connect). For each one not expired, the
//!    class's port tables are the entry's own when it was stamped with
//!    the whole [`maps::GENERATION`] value read in step 3 (the agent
//!    stamps every entry again after each switch); else they are found in
//!    the slot's destination trie under a [`FAMILY_NAME`] key (the class
//!    id, full length). Either way they are judged as in step 6. A rule
//!    found that way decides. A deny rule of any prefix
//!    that covers the address has already decided in step 5, so it beats
//!    every name. A rule found with [`verdict::BROKER`] (a credential
//!    rule) sends a TCP connect to the agent's egress broker: when
//!    [`maps::EGRESS_SETTINGS`] is enabled and [`maps::EGRESS_NETNS`] has
//!    the broker's listener in the caller's network namespace, the
//!    destination is rewritten to [`dns_address::of_slot`] (the range of
//!    [`DnsSettings::net`]) and the broker's port for the port asked
//!    (443 or 80), and the connect is allowed (reason
//!    [`reason::BROKERED`]); else it is denied
//!    ([`reason::EGRESS_NOT_READY`], [`reason::EGRESS_V6`]). A broker
//!    verdict for UDP, or from an address rule, is a deny.
//!
//! 8. Grants: when the decision so far is the slot's default (reason
//!    `DEFAULT`, not an allow) and the slot is not the unknown
//!    workload's, [`maps::GRANTS`] is read: an LPM trie keyed by
//!    [`GrantKey`] (slot, family, address prefix; the slot and family are
//!    always matched in full, so grants are per slot) -> [`GrantValue`],
//!    up to [`GRANT_INLINE`] [`GrantEntry`]s: every grant of the slot
//!    whose destination covers the entry's prefix (user space folds the
//!    less specific grants into each entry, so the longest match is the
//!    whole answer). The first entry not expired on the boot-time clock
//!    whose protocols and ports cover the connect allows it (reason
//!    [`reason::GRANT`], the grant's id as the rule id). A deny rule, a
//!    revocation or a missing policy has decided before: a grant never
//!    lifts them.
//!
//! A miss in steps 5 or 6 falls to the slot's default verdict. An absent
//! trie (only in the moment after an upgrade made the arrays anew, before
//! the agent's first write) is no policy: deny.
//!
//! # What a decision reports
//!
//! Every deny, every audit decision and every allow by a grant, and other
//! allow decisions as sampled by [`maps::EVENT_SETTINGS`], is written to [`maps::EVENTS`] as a
//! [`DecisionRecord`]. A record that does not fit (the ring buffer is full)
//! is counted in [`maps::EVENT_DROPS`] instead: none is lost silently.
#![no_std]

/// Names of the maps, as they appear in the object file and under the pin
/// directory.
pub mod maps {
    pub const IDENTITIES: &str = "IDG_IDENTITIES";
    /// Array of [`identity_index`](super::identity_index) entries, written
    /// by the agent through a shared mapping.
    pub const IDENTITY_INDEX: &str = "IDG_IDENTITY_INDEX";
    pub const SLOT_STATE: &str = "IDG_SLOT_STATE";
    pub const GENERATION: &str = "IDG_GENERATION";
    pub const SLOT_POLICY: &str = "IDG_SLOT_POLICY";
    /// Array of maps: [`slot_policy_index`](super::slot_policy_index) ->
    /// the slot's destination trie.
    pub const SLOT_DESTS: &str = "IDG_SLOT_DESTS";
    /// Array of maps: [`slot_policy_index`](super::slot_policy_index) ->
    /// the slot's port trie.
    pub const SLOT_PORTS: &str = "IDG_SLOT_PORTS";
    /// User-side record of which identity holds each slot (SHA-256 of the
    /// SPIFFE ID, all zero when free), pinned so that a restarted agent
    /// keeps every slot number and no binding points at the wrong policy.
    pub const SLOT_IDS: &str = "IDG_SLOT_IDS";
    /// Ring buffer of [`DecisionRecord`](super::DecisionRecord)s, kernel to
    /// agent. Pinned, so a restarted agent reads what was left in it.
    pub const EVENTS: &str = "IDG_EVENTS";
    /// One [`EventSettings`](super::EventSettings), written by the agent.
    pub const EVENT_SETTINGS: &str = "IDG_EVENT_SETTINGS";
    /// Per-CPU `u64` count of records that did not fit in [`EVENTS`].
    pub const EVENT_DROPS: &str = "IDG_EVENT_DROPS";
    /// One [`Scope`](super::Scope): the managed cgroup, for the exec
    /// tracepoint, which is not attached to it.
    pub const SCOPE: &str = "IDG_SCOPE";
    /// Ring buffer of [`ExecNotice`](super::ExecNotice)s: a process in the
    /// scope ran `exec`, so its cgroup is attested again.
    pub const EXEC_NOTICES: &str = "IDG_EXEC_NOTICES";
    /// Hash of [`LearnedKey`](super::LearnedKey) ->
    /// [`LearnedValue`](super::LearnedValue): addresses the DNS path
    /// learned for a slot, with their expiries. Not part of a policy
    /// generation: a class's meaning is (and a reload changes it in) the
    /// generation's tries.
    pub const LEARNED: &str = "IDG_LEARNED";
    /// One [`DnsSettings`](super::DnsSettings), written by the agent.
    pub const DNS_SETTINGS: &str = "IDG_DNS_SETTINGS";
    /// Socket hash of network-namespace cookie (`u64`) -> the agent's UDP
    /// DNS listener there. The kernel drops an entry when its socket
    /// closes, so a namespace has an entry exactly while the agent's
    /// resolver listens there: a query with none fails at once.
    pub const DNS_NETNS: &str = "IDG_DNS_NETNS";
    /// LRU hash of socket cookie (`u64`) -> [`DnsOrigin`](super::DnsOrigin):
    /// the server a redirected query was sent to, restored as the source
    /// of the reply (`recvmsg`) and as the peer (`getpeername`).
    pub const DNS_ORIGINS: &str = "IDG_DNS_ORIGINS";
    /// Hash of name id (`u32`) -> [`NameText`](super::NameText). Not
    /// read by the programs: the agent's record of the names in
    /// [`LEARNED`], so that a restarted agent still names them.
    pub const NAMES: &str = "IDG_NAMES";
    /// LPM trie of [`GrantKey`](super::GrantKey) ->
    /// [`GrantValue`](super::GrantValue): the operators' grants of each
    /// slot, with their expiries. Not part of a policy generation.
    pub const GRANTS: &str = "IDG_GRANTS";

    /// Hash of cgroup id (`u64`) -> `bpf_ktime_get_boot_ns` at which its
    /// binding ends, for bindings with [`binding::EXPIRES`](super::binding::EXPIRES).
    pub const BINDING_EXPIRY: &str = "IDG_BINDING_EXPIRY";
    /// One [`EgressSettings`](super::EgressSettings), written by the
    /// agent: whether, and to which ports, connects of credential rules
    /// are sent to its egress broker.
    pub const EGRESS_SETTINGS: &str = "IDG_EGRESS_SETTINGS";
    /// Socket hash of network-namespace cookie (`u64`) -> the broker's
    /// listening TCP socket there. The kernel drops an entry when its
    /// socket closes, so a namespace has an entry exactly while the
    /// broker listens there: a brokered connect with none is denied at
    /// once.
    pub const EGRESS_NETNS: &str = "IDG_EGRESS_NETNS";

    /// Every map, for pinning, adoption and uninstall.
    pub const ALL: [&str; 22] = [
        IDENTITIES,
        IDENTITY_INDEX,
        SLOT_STATE,
        GENERATION,
        SLOT_POLICY,
        SLOT_DESTS,
        SLOT_PORTS,
        SLOT_IDS,
        EVENTS,
        EVENT_SETTINGS,
        EVENT_DROPS,
        SCOPE,
        EXEC_NOTICES,
        LEARNED,
        DNS_SETTINGS,
        DNS_NETNS,
        DNS_ORIGINS,
        NAMES,
        GRANTS,
        BINDING_EXPIRY,
        EGRESS_SETTINGS,
        EGRESS_NETNS,
    ];
}

/// Names of the programs (their function names in the eBPF crate).
pub mod programs {
    pub const CONNECT4: &str = "idgate_connect4";
    pub const CONNECT6: &str = "idgate_connect6";
    pub const SENDMSG4: &str = "idgate_sendmsg4";
    pub const SENDMSG6: &str = "idgate_sendmsg6";
    /// `cgroup/sock_create`: raw sockets for managed workloads.
    pub const SOCK_CREATE: &str = "idgate_sock_create";
    /// `cgroup/recvmsg4|6`: the source of a redirected DNS reply is
    /// restored to the server the workload asked.
    pub const RECVMSG4: &str = "idgate_recvmsg4";
    pub const RECVMSG6: &str = "idgate_recvmsg6";
    /// `cgroup/getpeername4|6`: likewise, the peer of a redirected socket.
    pub const GETPEERNAME4: &str = "idgate_getpeername4";
    pub const GETPEERNAME6: &str = "idgate_getpeername6";
    /// Raw tracepoint `sched_process_exec`: exec notices.
    pub const EXEC: &str = "idgate_exec";

    /// Every program whose link is pinned (enforcement without the agent).
    pub const PINNED: [&str; 9] = [
        CONNECT4,
        CONNECT6,
        SENDMSG4,
        SENDMSG6,
        SOCK_CREATE,
        RECVMSG4,
        RECVMSG6,
        GETPEERNAME4,
        GETPEERNAME6,
    ];
}

/// The managed scope, for programs not attached to it: a task is in the
/// scope when its cgroup's ancestor at `level` is `cgroup_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    /// 0 until the agent has written it: then nothing is in scope.
    pub cgroup_id: u64,
    /// Depth of the scope below the cgroup v2 root (the root is 0).
    pub level: u32,
    pub _pad: u32,
}

/// A process in the scope ran `exec`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecNotice {
    pub cgroup_id: u64,
    pub tgid: u32,
    pub _pad: u32,
}

/// Bytes of the exec-notice ring buffer.
pub const EXEC_RING_BYTES: u32 = 64 * 1024;

/// Number of identity slots, [`UNKNOWN_SLOT`] included.
pub const MAX_SLOTS: u32 = 65_536;
/// Cgroups that can hold an identity at once.
pub const MAX_BOUND_CGROUPS: u32 = 65_536;
/// The direct-mapped index of bindings in front of [`maps::IDENTITIES`].
///
/// A cgroup's entry is at [`position`](identity_index::position), the low
/// bits of its id (cgroup ids are handed out in sequence, so the bound
/// cgroups of a host rarely share one). The entry holds the rest of the id
/// and the slot in one `u64`, which the agent stores and a program loads in
/// one access: a program sees the entry before or after a change, never a
/// mix. An entry that is not this cgroup's sends the program to
/// [`maps::IDENTITIES`], which holds every binding.
///
/// The agent keeps every entry equal to a binding of the hash: it binds in
/// the hash first and then here, and unbinds here first.
pub mod identity_index {
    /// Entries of the index.
    pub const ENTRIES: u32 = 1 << POSITION_BITS;
    const POSITION_BITS: u32 = 16;
    /// Set in every entry that holds a binding (0 is an empty entry).
    const BOUND: u64 = 1 << 63;
    const SLOT_MASK: u64 = (1 << 16) - 1;

    /// Where `cgroup`'s entry is.
    #[inline(always)]
    pub const fn position(cgroup: u64) -> u32 {
        (cgroup & (ENTRIES as u64 - 1)) as u32
    }

    /// The entry binding `cgroup` to `slot`, or `None` when the index cannot
    /// hold it (an id of 63 bits or more, or a slot beyond 16 bits): then
    /// the hash alone does.
    pub const fn entry(cgroup: u64, slot: u32) -> Option<u64> {
        let rest = cgroup >> POSITION_BITS;
        if rest >= BOUND >> POSITION_BITS || slot as u64 > SLOT_MASK {
            return None;
        }
        Some(BOUND | rest << POSITION_BITS | slot as u64)
    }

    /// The cgroup of `entry`, found at `position`, if it holds one.
    pub const fn cgroup(entry: u64, position: u32) -> Option<u64> {
        if entry & BOUND == 0 {
            return None;
        }
        Some((entry & !BOUND) >> POSITION_BITS << POSITION_BITS | position as u64)
    }

    /// The slot that `entry` (read at `cgroup`'s position) binds `cgroup`
    /// to, if it is that cgroup's.
    #[inline(always)]
    pub const fn slot(entry: u64, cgroup: u64) -> Option<u32> {
        if entry & BOUND != 0 && (entry & !BOUND) >> POSITION_BITS == cgroup >> POSITION_BITS {
            Some((entry & SLOT_MASK) as u32)
        } else {
            None
        }
    }
}

/// Values of [`maps::IDENTITIES`].
pub mod binding {
    /// Set on a binding that ends at the time in
    /// [`maps::BINDING_EXPIRY`](super::maps::BINDING_EXPIRY). The index
    /// never holds such a binding (its slot field is 16 bits), so every
    /// lookup of it reads the expiry.
    pub const EXPIRES: u32 = 1 << 31;

    /// The slot of a binding's value.
    #[inline(always)]
    pub const fn slot(value: u32) -> u32 {
        value & !EXPIRES
    }
}

/// Policy generations kept in the maps: the active one and the next.
pub const GENERATIONS: u32 = 2;
/// Address-prefix entries of one rule set's destination trie (both
/// families).
pub const MAX_SET_DESTS: u32 = 262_144;
/// Port-block entries of one rule set's port trie (all its tables).
pub const MAX_SET_PORT_BLOCKS: u32 = 262_144;

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
    /// Only in a name class's port table (a credential rule): a TCP
    /// connect goes to the agent's egress broker (see
    /// [`EgressSettings`](super::EgressSettings)); anything else is denied.
    /// Never a decision record's verdict: a brokered connect is an allow
    /// with reason [`BROKERED`](super::reason::BROKERED).
    pub const BROKER: u32 = 2;
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
    /// The identity may create raw (`SOCK_RAW`) IPv4 and IPv6 sockets,
    /// which bypass the connect and sendmsg hooks.
    pub const RAW_SOCKETS: u32 = 4;
    /// The identity's DNS is not sent to the agent's resolver (`[dns]
    /// direct`): its port-53 traffic is judged by its address rules, as
    /// any other. For a recursive resolver run inside the scope.
    pub const DNS_DIRECT: u32 = 8;
    /// The rule set has no address rules, only names: step 5's lookup
    /// would find nothing, so it is skipped.
    pub const NO_ADDRESS_RULES: u32 = 16;
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

/// Index of a slot's entry in [`maps::SLOT_POLICY`], [`maps::SLOT_DESTS`] and
/// [`maps::SLOT_PORTS`].
#[inline(always)]
pub const fn slot_policy_index(generation: u32, slot: u32) -> u32 {
    (generation & 1) * MAX_SLOTS + (slot % MAX_SLOTS)
}

/// [`DestKey::family`] of an IPv4 prefix (and of an IPv4-mapped IPv6
/// destination when it is looked up).
pub const FAMILY_V4: u32 = 4;
/// [`DestKey::family`] of an IPv6 prefix.
pub const FAMILY_V6: u32 = 6;
/// [`DestKey::family`] of a name class: the key's first
/// [`NAME_CLASS_BYTES`] address bytes are the class id, always matched in
/// full (see step 7 of the lookup).
pub const FAMILY_NAME: u32 = 1;
/// Bytes of a name class id.
pub const NAME_CLASS_BYTES: usize = 16;

/// LPM data of a destination trie. The first [`DEST_FIXED_BITS`] bits
/// (the family) are always matched in full.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DestKey {
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u32,
    /// Address bytes in network order: an IPv4 address in the first four.
    pub addr: [u8; 16],
}

/// Bits of a destination key before the address: the family.
pub const DEST_FIXED_BITS: u32 = 32;

/// Port ranges a [`PortTable`] holds itself; a table with more is in the
/// port trie.
pub const INLINE_RANGES: usize = 4;

/// One range of ports of an inline table, and what it says.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortRange {
    /// First port, host order.
    pub first: u16,
    /// Last port (inclusive), host order.
    pub last: u16,
    pub verdict: u32,
    pub rule_id: u32,
}

/// What one protocol's ports decide under a destination prefix: the first
/// `count` of `ranges` (disjoint), or else the port trie's `table`. With
/// neither (`count` 0 and [`NO_TABLE`]), the slot's default decides, and
/// so it does for a port in no range.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortTable {
    /// A table of [`maps::SLOT_PORTS`] when `count` is 0, or [`NO_TABLE`].
    pub table: u32,
    /// Ranges in use, at most [`INLINE_RANGES`].
    pub count: u32,
    pub ranges: [PortRange; INLINE_RANGES],
}

/// Value of the destination tries: the port table for each protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DestTables {
    /// For TCP (and MPTCP) sockets.
    pub tcp: PortTable,
    /// For UDP sockets.
    pub udp: PortTable,
}

/// LPM data of a port trie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortKey {
    /// A table of the rule set (from 1; [`NO_TABLE`] is never stored).
    pub table: u32,
    /// Port in network order.
    pub port: [u8; 2],
    /// Always zero; beyond every prefix.
    pub _pad: [u8; 2],
}

/// Bits of a port key before the port: the table.
pub const PORT_FIXED_BITS: u32 = 32;

/// Value of a port trie: what the matching rule says.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleVerdict {
    pub verdict: u32,
    pub rule_id: u32,
}

/// Entries of [`maps::LEARNED`] (all slots together).
pub const MAX_LEARNED: u32 = 262_144;
/// Name classes one learned address can hold for one slot.
pub const LEARNED_INLINE: usize = 4;

/// Key of [`maps::LEARNED`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LearnedKey {
    pub slot: u32,
    /// [`FAMILY_V4`] (an IPv4 address in the first four bytes, the rest
    /// zero) or [`FAMILY_V6`].
    pub family: u32,
    pub addr: [u8; 16],
}

/// One name class an address was learned for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LearnedName {
    /// `CLOCK_MONOTONIC` nanoseconds after which this entry opens nothing
    /// (the programs read it with `bpf_ktime_get_coarse_ns`); 0 is an
    /// unused entry.
    pub expiry_ns: u64,
    /// The class id: the [`FAMILY_NAME`] key of the rule set's tries.
    pub class: [u8; NAME_CLASS_BYTES],
    /// The name looked up (a key of [`maps::NAMES`]), for the record.
    pub name_id: u32,
    /// The whole [`maps::GENERATION`] value `tables` were taken at; 0:
    /// none. Only while it is the value now are `tables` the class's.
    pub generation: u32,
    /// The class's port tables in that generation's rule set of the slot,
    /// as under its [`FAMILY_NAME`] key: so the programs need not look
    /// the class up.
    pub tables: DestTables,
}

/// Value of [`maps::LEARNED`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LearnedValue {
    pub names: [LearnedName; LEARNED_INLINE],
}

/// Prefix entries of [`maps::GRANTS`] (all slots together): one per
/// distinct destination of a slot's grants at most.
pub const MAX_GRANT_ENTRIES: u32 = 16_384;
/// Grants one prefix entry of [`maps::GRANTS`] holds: the grants of the
/// slot whose destinations cover the prefix. A grant that would make an
/// entry hold more is refused.
pub const GRANT_INLINE: usize = 4;

/// LPM data of [`maps::GRANTS`]. The first [`GRANT_FIXED_BITS`] bits (the
/// slot and the family) are always matched in full.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GrantKey {
    pub slot: u32,
    /// [`FAMILY_V4`] (an IPv4 address in the first four bytes, the rest
    /// zero) or [`FAMILY_V6`].
    pub family: u32,
    /// The prefix's address bytes, network order, zero past the prefix.
    pub addr: [u8; 16],
}

/// Bits of a grant key before the address: the slot and the family.
pub const GRANT_FIXED_BITS: u32 = 64;

/// Flags in [`GrantEntry::protocols`].
pub mod grant_protocols {
    /// TCP (and MPTCP) sockets.
    pub const TCP: u32 = 1;
    /// UDP sockets.
    pub const UDP: u32 = 2;
}

/// One grant in a [`GrantValue`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GrantEntry {
    /// `bpf_ktime_get_boot_ns` from which this grant allows nothing; 0 is
    /// an unused entry.
    pub expiry_boot_ns: u64,
    /// The grant's id, reported as the decision's rule id.
    pub id: u32,
    /// [`grant_protocols`] flags.
    pub protocols: u32,
    /// First port, host order.
    pub first: u16,
    /// Last port (inclusive), host order.
    pub last: u16,
    pub _pad: u32,
}

/// Value of [`maps::GRANTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GrantValue {
    pub grants: [GrantEntry; GRANT_INLINE],
}

/// Longest name in [`maps::NAMES`]: a DNS name in text, without the
/// final dot (RFC 1035: 253 characters).
pub const NAME_TEXT_BYTES: usize = 256;

/// Value of [`maps::NAMES`]: the name's bytes, NUL-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NameText {
    pub text: [u8; NAME_TEXT_BYTES],
}

/// Value of [`maps::DNS_SETTINGS`]. While `enabled` is 0 (the agent has
/// not written it, or `[dns]` is off), port-53 traffic is judged like any
/// other.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsSettings {
    pub enabled: u32,
    /// Second octet of the reserved loopback range `127.N.0.0/16`: a
    /// query of slot S goes to `127.N.(S >> 8).(S & 0xff)`. Workloads may
    /// not send anything to the range themselves.
    pub net: u32,
    /// Port of the agent's listeners, host order.
    pub port: u32,
    pub _pad: u32,
}

/// Value of [`maps::EGRESS_SETTINGS`]. While `enabled` is 0 (the agent
/// has not written it, or has no broker), a connect a credential rule
/// decides is denied. The broker listens on the addresses of the DNS
/// path's range ([`DnsSettings::net`], see [`dns_address`]), so it is
/// reached only while that range is reserved (`[dns]` on).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressSettings {
    pub enabled: u32,
    /// The broker's port for connects to port 443, host order.
    pub tls_port: u32,
    /// The broker's port for connects to port 80, host order.
    pub http_port: u32,
    pub _pad: u32,
}

/// The loopback address a query of `slot` is sent to, in network order,
/// and the slot such an address stands for.
pub mod dns_address {
    /// The address for `slot` in the range `127.net.0.0/16`.
    #[inline(always)]
    pub const fn of_slot(net: u32, slot: u32) -> [u8; 4] {
        [127, net as u8, (slot >> 8) as u8, slot as u8]
    }

    /// The slot `addr` stands for, when it is in the range.
    pub const fn slot(net: u32, addr: [u8; 4]) -> Option<u32> {
        if addr[0] == 127 && addr[1] as u32 == net {
            Some((addr[2] as u32) << 8 | addr[3] as u32)
        } else {
            None
        }
    }
}

/// Value of [`maps::DNS_ORIGINS`]: where a workload sent its query.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsOrigin {
    /// Address as the workload wrote it, network order (IPv4 in the first
    /// four bytes; an IPv6 hook keeps the mapped form it saw).
    pub addr: [u8; 16],
    /// Port, network order, as in `bpf_sock_addr.user_port`.
    pub port: u32,
    /// [`FAMILY_V4`] or [`FAMILY_V6`]: which hook saw it.
    pub family: u32,
}

/// Bytes of the [`maps::EVENTS`] ring buffer: a power-of-two multiple of
/// the page size. About 9,000 records.
pub const EVENTS_RING_BYTES: u32 = 1 << 20;

/// Which hook made a decision ([`DecisionRecord::hook`]).
pub mod hook {
    pub const CONNECT4: u32 = 1;
    pub const CONNECT6: u32 = 2;
    pub const SENDMSG4: u32 = 3;
    pub const SENDMSG6: u32 = 4;

    /// The hook's name in events, or `None` for an unknown code.
    pub const fn name(code: u32) -> Option<&'static str> {
        match code {
            CONNECT4 => Some("connect4"),
            CONNECT6 => Some("connect6"),
            SENDMSG4 => Some("sendmsg4"),
            SENDMSG6 => Some("sendmsg6"),
            _ => None,
        }
    }
}

/// Why a decision came out as it did ([`DecisionRecord::reason`]).
pub mod reason {
    /// A rule of the identity's policy matched.
    pub const RULE: u32 = 1;
    /// No rule matched: the identity's default decided.
    pub const DEFAULT: u32 = 2;
    /// The cgroup has no identity and no rule of the unknown-workload
    /// policy matched: that policy's default decided.
    pub const UNKNOWN_WORKLOAD: u32 = 3;
    /// The identity is revoked: denied whatever the policy says.
    pub const REVOKED: u32 = 4;
    /// The active generation has no policy for the slot: denied.
    pub const NO_POLICY: u32 = 5;
    /// The policy (a rule, or the default) denied, but the identity is in
    /// audit mode: let through and reported.
    pub const AUDIT_ALLOWED: u32 = 6;
    /// A DNS query from a network namespace where the agent's resolver
    /// is not listening (yet): denied, so it fails at once.
    pub const DNS_NOT_READY: u32 = 7;
    /// The destination is in the loopback range reserved for the agent's
    /// resolver: only queries the kernel sent there may reach it.
    pub const RESERVED: u32 = 8;
    /// A DNS query to an IPv6 server: the reply could not be given the
    /// server's address back (see docs/architecture.md), so it is denied.
    pub const DNS_V6: u32 = 9;
    /// No rule matched and the identity's default denies, but an
    /// operator's grant of the identity allows the connect; the rule id
    /// is the grant's id.
    pub const GRANT: u32 = 10;
    /// A credential rule decided: the connect was sent to the agent's
    /// egress broker (its destination rewritten) and let through.
    pub const BROKERED: u32 = 11;
    /// A credential rule decided, but the broker is not listening in the
    /// caller's network namespace (yet), or the redirect is off: denied,
    /// so it fails at once.
    pub const EGRESS_NOT_READY: u32 = 12;
    /// A credential rule decided a connect to an IPv6 address: the
    /// broker listens on IPv4 loopback addresses only, so it is denied
    /// (clients try the host's IPv4 addresses next).
    pub const EGRESS_V6: u32 = 13;

    /// The reason's name in events, or `None` for an unknown code.
    pub const fn name(code: u32) -> Option<&'static str> {
        match code {
            RULE => Some("rule"),
            DEFAULT => Some("default"),
            UNKNOWN_WORKLOAD => Some("unknown_workload"),
            REVOKED => Some("revoked"),
            NO_POLICY => Some("no_policy"),
            AUDIT_ALLOWED => Some("audit_allowed"),
            DNS_NOT_READY => Some("dns_not_ready"),
            RESERVED => Some("reserved"),
            DNS_V6 => Some("dns_v6"),
            GRANT => Some("grant"),
            BROKERED => Some("brokered"),
            EGRESS_NOT_READY => Some("egress_not_ready"),
            EGRESS_V6 => Some("egress_v6"),
            _ => None,
        }
    }
}

/// Flags in [`DecisionRecord::flags`].
pub mod record_flags {
    /// An IPv6 hook saw an IPv4-mapped address (`::ffff:a.b.c.d`); it was
    /// judged by the IPv4 rules. The address is kept as the hook saw it.
    pub const V4_MAPPED: u32 = 1;
    /// A rule for a name decided: the address was learned from a lookup
    /// of [`DecisionRecord::name_id`](super::DecisionRecord::name_id).
    pub const LEARNED: u32 = 2;
}

/// [`DecisionRecord::layout`] of the record defined here. A reader skips
/// records of another layout (left in the pinned ring buffer by programs of
/// another version) instead of misreading them.
pub const RECORD_LAYOUT: u32 = 2;

/// One decision, as the kernel program saw it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecisionRecord {
    /// `bpf_ktime_get_ns`: `CLOCK_MONOTONIC`, for ordering and latency.
    pub ktime_ns: u64,
    /// `bpf_ktime_get_boot_ns`: `CLOCK_BOOTTIME`, which counts suspend, for
    /// converting to wall-clock time in user space.
    pub boot_ns: u64,
    /// Cgroup of the task that made the call.
    pub cgroup_id: u64,
    /// `bpf_get_current_pid_tgid`: thread group (process) id in the upper
    /// 32 bits, thread id in the lower.
    pub pid_tgid: u64,
    /// `bpf_get_current_uid_gid`: gid in the upper 32 bits, uid in the lower.
    pub uid_gid: u64,
    /// Identity slot ([`UNKNOWN_SLOT`] for a cgroup without identity).
    pub slot: u32,
    /// Policy generation the decision was made by (0 or 1).
    pub generation: u32,
    /// [`hook`] code.
    pub hook: u32,
    /// The socket's IP protocol number (6 TCP, 17 UDP, 262 MPTCP).
    pub protocol: u32,
    /// [`verdict`] as enforced.
    pub verdict: u32,
    /// [`reason`] code.
    pub reason: u32,
    /// The deciding rule ([`SlotPolicy::default_rule`] for a default);
    /// 0 for revoked and no-policy decisions.
    pub rule_id: u32,
    /// [`record_flags`].
    pub flags: u32,
    /// Destination port, host order.
    pub port: u32,
    /// [`RECORD_LAYOUT`].
    pub layout: u32,
    /// Destination address in network order: an IPv4 address in the first
    /// four bytes (the rest zero), or the IPv6 address as the hook saw it.
    pub addr: [u8; 16],
    /// `bpf_get_current_comm`: the thread's name, NUL-padded.
    pub comm: [u8; 16],
    /// With [`record_flags::LEARNED`]: the name (a key of
    /// [`maps::NAMES`]) whose lookup opened the address; else 0.
    pub name_id: u32,
    pub _pad: u32,
}

/// Value of [`maps::EVENT_SETTINGS`] (one entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventSettings {
    /// An allow decision is recorded when `bpf_get_prandom_u32()` is below
    /// this: 0 records none, [`SAMPLE_ALL`] every one.
    pub allow_sample: u64,
}

/// [`EventSettings::allow_sample`] that records every allow decision.
pub const SAMPLE_ALL: u64 = 1 << 32;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is `repr(C)`, made of integers and byte arrays with
    // no implicit padding, so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::SlotPolicy {}
    unsafe impl aya::Pod for super::DestKey {}
    unsafe impl aya::Pod for super::DestTables {}
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::RuleVerdict {}
    unsafe impl aya::Pod for super::DecisionRecord {}
    unsafe impl aya::Pod for super::EventSettings {}
    unsafe impl aya::Pod for super::Scope {}
    unsafe impl aya::Pod for super::ExecNotice {}
    unsafe impl aya::Pod for super::LearnedKey {}
    unsafe impl aya::Pod for super::LearnedValue {}
    unsafe impl aya::Pod for super::NameText {}
    unsafe impl aya::Pod for super::DnsSettings {}
    unsafe impl aya::Pod for super::EgressSettings {}
    unsafe impl aya::Pod for super::DnsOrigin {}
    unsafe impl aya::Pod for super::GrantKey {}
    unsafe impl aya::Pod for super::GrantValue {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn records_have_no_implicit_padding() {
        assert_eq!(size_of::<SlotPolicy>(), 12);
        assert_eq!(size_of::<DestKey>(), 20);
        assert_eq!(size_of::<Scope>(), 16);
        assert_eq!(size_of::<ExecNotice>(), 16);
        assert_eq!(size_of::<PortRange>(), 12);
        assert_eq!(size_of::<PortTable>(), 8 + 12 * INLINE_RANGES);
        assert_eq!(size_of::<DestTables>(), 2 * size_of::<PortTable>());
        assert_eq!(size_of::<PortKey>(), 8);
        assert_eq!(size_of::<RuleVerdict>(), 8);
        assert_eq!(size_of::<DecisionRecord>(), 120);
        assert_eq!(size_of::<LearnedKey>(), 24);
        assert_eq!(size_of::<LearnedName>(), 32 + size_of::<DestTables>());
        assert_eq!(
            size_of::<LearnedValue>(),
            size_of::<LearnedName>() * LEARNED_INLINE
        );
        assert_eq!(size_of::<NameText>(), NAME_TEXT_BYTES);
        assert_eq!(size_of::<DnsSettings>(), 16);
        assert_eq!(size_of::<EgressSettings>(), 16);
        assert_eq!(size_of::<DnsOrigin>(), 24);
        assert_eq!(size_of::<EventSettings>(), 8);
        assert_eq!(size_of::<GrantKey>(), 24);
        assert_eq!(size_of::<GrantEntry>(), 24);
        assert_eq!(size_of::<GrantValue>(), 24 * GRANT_INLINE);
    }

    #[test]
    fn every_code_has_one_name() {
        let hooks = [
            hook::CONNECT4,
            hook::CONNECT6,
            hook::SENDMSG4,
            hook::SENDMSG6,
        ];
        let reasons = [
            reason::RULE,
            reason::DEFAULT,
            reason::UNKNOWN_WORKLOAD,
            reason::REVOKED,
            reason::NO_POLICY,
            reason::AUDIT_ALLOWED,
            reason::DNS_NOT_READY,
            reason::RESERVED,
            reason::DNS_V6,
            reason::GRANT,
            reason::BROKERED,
            reason::EGRESS_NOT_READY,
            reason::EGRESS_V6,
        ];
        for (i, h) in hooks.iter().enumerate() {
            let name = hook::name(*h).unwrap();
            assert!(hooks[..i].iter().all(|o| hook::name(*o) != Some(name)));
        }
        for (i, r) in reasons.iter().enumerate() {
            let name = reason::name(*r).unwrap();
            assert!(reasons[..i].iter().all(|o| reason::name(*o) != Some(name)));
        }
        assert_eq!(hook::name(0), None);
        assert_eq!(reason::name(0), None);
    }

    #[test]
    fn an_index_entry_is_its_own_cgroup_s_only() {
        use identity_index::{cgroup, entry, position, slot};
        let id = (1u64 << 32) | 0x0002_1234;
        let e = entry(id, MAX_SLOTS - 1).unwrap();
        assert_eq!(slot(e, id), Some(MAX_SLOTS - 1));
        assert_eq!(cgroup(e, position(id)), Some(id));
        // Another cgroup at the same position, or an empty entry: not found.
        assert_eq!(position(id + 0x1_0000), position(id));
        assert_eq!(slot(e, id + 0x1_0000), None);
        assert_eq!(slot(0, id), None);
        assert_eq!(slot(0, position(id) as u64), None);
        assert_eq!(cgroup(0, 7), None);
        // Slot 0 and small ids are held like any other.
        assert_eq!(slot(entry(5, UNKNOWN_SLOT).unwrap(), 5), Some(UNKNOWN_SLOT));
        // What does not fit stays in the hash alone.
        assert_eq!(entry(1 << 63, 1), None);
        assert_eq!(entry(u64::MAX, 1), None);
        assert_eq!(entry(id, 1 << 16), None);
        assert!(entry((1 << 63) - 1, 1).is_some());
    }

    #[test]
    fn a_slot_s_dns_address_gives_the_slot_back() {
        for slot in [UNKNOWN_SLOT, 1, 255, 256, MAX_SLOTS - 1] {
            let a = dns_address::of_slot(53, slot);
            assert_eq!(dns_address::slot(53, a), Some(slot));
            assert_eq!(dns_address::slot(54, a), None);
        }
        assert_eq!(dns_address::slot(53, [10, 53, 0, 1]), None);
    }

    #[test]
    fn slot_policy_index_separates_generations() {
        assert_eq!(slot_policy_index(0, 5), 5);
        assert_eq!(slot_policy_index(1, 5), MAX_SLOTS + 5);
        assert_eq!(slot_policy_index(3, 5), MAX_SLOTS + 5);
        assert!(slot_policy_index(1, MAX_SLOTS - 1) < GENERATIONS * MAX_SLOTS);
    }
}
