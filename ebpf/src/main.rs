//! idgate's kernel programs: one thin entry per cgroup sock_addr hook, all
//! calling [`decide`]. The lookup chain is described in `idgate-common`.
#![no_std]
#![no_main]

mod dns;
mod egress;
mod exec;
mod raw_sockets;

use aya_ebpf::{
    btf_maps::{ArrayOfMaps, LpmTrie},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{
            bpf_get_current_comm, bpf_get_prandom_u32, bpf_ktime_get_boot_ns,
            bpf_ktime_get_coarse_ns, bpf_ktime_get_ns,
        },
    },
    macros::{btf_map, cgroup_sock_addr, map},
    maps::{Array, HashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::SockAddrContext,
};
use core::ptr::{addr_of, addr_of_mut, read_volatile};
use idgate_common::{
    DEST_FIXED_BITS, DecisionRecord, DestKey, DestTables, EVENTS_RING_BYTES, EventSettings,
    FAMILY_NAME, FAMILY_V4, FAMILY_V6, GENERATIONS, GRANT_FIXED_BITS, GRANT_INLINE, GrantKey,
    GrantValue, INLINE_RANGES, LEARNED_INLINE, LearnedKey, LearnedValue, MAX_BOUND_CGROUPS,
    MAX_GRANT_ENTRIES, MAX_LEARNED, MAX_SET_DESTS, MAX_SET_PORT_BLOCKS, MAX_SLOTS, NAME_TEXT_BYTES,
    NO_TABLE, NameText, PORT_FIXED_BITS, PortKey, PortTable, RECORD_LAYOUT, RuleVerdict,
    SlotPolicy, UNKNOWN_SLOT, binding, grant_protocols, hook, identity_index, reason, record_flags,
    slot_policy, slot_policy_index, slot_state, verdict,
};

#[map(name = "IDG_IDENTITIES")]
static IDENTITIES: HashMap<u64, u32> = HashMap::pinned(MAX_BOUND_CGROUPS, 0);

/// `BPF_F_MMAPABLE`: the agent writes the index through a shared mapping.
const MMAPABLE: u32 = 1 << 10;

/// The end of each binding with [`binding::EXPIRES`].
#[map(name = "IDG_BINDING_EXPIRY")]
static BINDING_EXPIRY: HashMap<u64, u64> = HashMap::pinned(MAX_BOUND_CGROUPS, 0);

#[map(name = "IDG_IDENTITY_INDEX")]
static IDENTITY_INDEX: Array<u64> = Array::pinned(identity_index::ENTRIES, MMAPABLE);

#[map(name = "IDG_SLOT_STATE")]
static SLOT_STATE: Array<u32> = Array::pinned(MAX_SLOTS, 0);

#[map(name = "IDG_GENERATION")]
static GENERATION: Array<u32> = Array::pinned(1, 0);

#[map(name = "IDG_SLOT_POLICY")]
static SLOT_POLICY: Array<SlotPolicy> = Array::pinned(GENERATIONS * MAX_SLOTS, 0);

/// Entries of each outer array: one per slot and generation.
const SLOT_ENTRIES: usize = (GENERATIONS * MAX_SLOTS) as usize;

// Arrays of maps are BTF-defined (the inner trie is their template); the
// agent pins them itself.
#[btf_map(name = "IDG_SLOT_DESTS")]
static SLOT_DESTS: ArrayOfMaps<DestTrie, SLOT_ENTRIES> = ArrayOfMaps::new();

type PortTrie = LpmTrie<PortKey, RuleVerdict, { MAX_SET_PORT_BLOCKS as usize }>;

#[btf_map(name = "IDG_SLOT_PORTS")]
static SLOT_PORTS: ArrayOfMaps<PortTrie, SLOT_ENTRIES> = ArrayOfMaps::new();

/// Not read here: the agent keeps its slot table in it (see idgate-common).
#[map(name = "IDG_SLOT_IDS")]
static SLOT_IDS: Array<[u8; 32]> = Array::pinned(MAX_SLOTS, 0);

#[map(name = "IDG_EVENTS")]
static EVENTS: RingBuf = RingBuf::pinned(EVENTS_RING_BYTES, 0);

#[map(name = "IDG_EVENT_SETTINGS")]
static EVENT_SETTINGS: Array<EventSettings> = Array::pinned(1, 0);

/// `BPF_F_NO_PREALLOC`: an entry replaced by the agent is freed only
/// after every program that may still read it has finished.
const NO_PREALLOC: u32 = 1;

#[map(name = "IDG_LEARNED")]
static LEARNED: HashMap<LearnedKey, LearnedValue> = HashMap::pinned(MAX_LEARNED, NO_PREALLOC);

/// Not read here: the agent's record of the names in `IDG_LEARNED`.
#[map(name = "IDG_NAMES")]
static NAMES: HashMap<u32, NameText> = HashMap::pinned(MAX_LEARNED, NO_PREALLOC);

const _: () = assert!(NAME_TEXT_BYTES == core::mem::size_of::<NameText>());

/// Operators' grants per slot (see idgate-common, step 8).
#[map(name = "IDG_GRANTS")]
static GRANTS: aya_ebpf::maps::LpmTrie<GrantKey, GrantValue> =
    aya_ebpf::maps::LpmTrie::pinned(MAX_GRANT_ENTRIES, 0);

#[map(name = "IDG_EVENT_DROPS")]
static EVENT_DROPS: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);

const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const IPPROTO_MPTCP: u32 = 262;

/// A destination as the hook saw it, in network byte order.
pub(crate) struct Dest {
    /// An IPv4 address in the first four bytes, or an IPv6 address.
    addr: [u8; 16],
    /// Judged by the IPv4 rules: an IPv4 hook, or a mapped address.
    v4: bool,
    /// [`record_flags`] for the event.
    flags: u32,
}

impl Dest {
    /// The IPv4 address of a destination judged by the IPv4 rules.
    #[inline(always)]
    fn v4_bytes(&self) -> [u8; 4] {
        let from = if self.flags & record_flags::V4_MAPPED != 0 {
            12
        } else {
            0
        };
        [
            self.addr[from],
            self.addr[from + 1],
            self.addr[from + 2],
            self.addr[from + 3],
        ]
    }
}

/// What [`decide`] found.
struct Decision {
    slot: u32,
    generation: u32,
    verdict: u32,
    reason: u32,
    rule_id: u32,
    /// [`record_flags::LEARNED`] when a name rule decided.
    flags: u32,
    /// The name whose lookup opened the address, with that flag.
    name_id: u32,
}

#[cgroup_sock_addr(connect4)]
pub fn idgate_connect4(ctx: SockAddrContext) -> i32 {
    judge(&ctx, hook::CONNECT4, dest_v4(&ctx))
}

#[cgroup_sock_addr(connect6)]
pub fn idgate_connect6(ctx: SockAddrContext) -> i32 {
    judge(&ctx, hook::CONNECT6, dest_v6(&ctx))
}

#[cgroup_sock_addr(sendmsg4)]
pub fn idgate_sendmsg4(ctx: SockAddrContext) -> i32 {
    judge(&ctx, hook::SENDMSG4, dest_v4(&ctx))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn idgate_sendmsg6(ctx: SockAddrContext) -> i32 {
    judge(&ctx, hook::SENDMSG6, dest_v6(&ctx))
}

// Context fields are read one at a time with volatile loads: the verifier
// rejects a load that spans two fields, which LLVM may otherwise merge.

fn dest_v4(ctx: &SockAddrContext) -> Dest {
    // SAFETY: the pointer is the hook's context, valid for the whole call.
    let ip = unsafe { read_volatile(addr_of!((*ctx.sock_addr).user_ip4)) };
    let mut addr = [0u8; 16];
    let b = ip.to_ne_bytes();
    addr[0] = b[0];
    addr[1] = b[1];
    addr[2] = b[2];
    addr[3] = b[3];
    Dest {
        addr,
        v4: true,
        flags: 0,
    }
}

fn dest_v6(ctx: &SockAddrContext) -> Dest {
    // SAFETY: as in `dest_v4`.
    let w = unsafe {
        [
            read_volatile(addr_of!((*ctx.sock_addr).user_ip6[0])),
            read_volatile(addr_of!((*ctx.sock_addr).user_ip6[1])),
            read_volatile(addr_of!((*ctx.sock_addr).user_ip6[2])),
            read_volatile(addr_of!((*ctx.sock_addr).user_ip6[3])),
        ]
    };
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = w[i].to_ne_bytes();
        addr[i * 4] = b[0];
        addr[i * 4 + 1] = b[1];
        addr[i * 4 + 2] = b[2];
        addr[i * 4 + 3] = b[3];
        i += 1;
    }
    // `::ffff:a.b.c.d` reaches an IPv4 host: judge it by the IPv4 rules.
    let mapped = w[0] == 0 && w[1] == 0 && w[2] == u32::from_be(0xffff);
    Dest {
        addr,
        v4: mapped,
        flags: if mapped { record_flags::V4_MAPPED } else { 0 },
    }
}

/// Decides one connect or send, reports it, and returns what the hook
/// answers: 1 lets the call through, 0 fails it with EPERM.
#[inline(always)]
fn judge(ctx: &SockAddrContext, hook: u32, dest: Dest) -> i32 {
    // SAFETY: as in `dest_v4`.
    let (protocol, user_port) = unsafe {
        (
            read_volatile(addr_of!((*ctx.sock_addr).protocol)),
            read_volatile(addr_of!((*ctx.sock_addr).user_port)),
        )
    };
    let port = u16::from_be(user_port as u16);
    // The identity is that of the task making the call, in the cgroup it is
    // in now (`bpf_sk_cgroup_id` is not allowed in these hooks). Which
    // programs run at all is decided by the socket's cgroup, so a socket
    // made outside the scope is not judged here: see docs/architecture.md.
    // SAFETY: helper without arguments.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    let slot = slot_of(cgroup);
    let d = match dns::redirect(ctx, slot, protocol, port, &dest) {
        dns::Redirect::Done => return 1,
        dns::Redirect::Deny(why) => Decision {
            slot,
            generation: GENERATION.get(0).copied().unwrap_or(0) & 1,
            verdict: verdict::DENY,
            reason: why,
            rule_id: 0,
            flags: 0,
            name_id: 0,
        },
        dns::Redirect::No => decide(ctx, slot, protocol, port, &dest),
    };
    // An operator's grant is an exception to policy: every use of one is
    // recorded, as every audit-mode allow is.
    if d.verdict == verdict::DENY
        || d.reason == reason::AUDIT_ALLOWED
        || d.reason == reason::GRANT
        || sampled()
    {
        report(hook, cgroup, protocol, port, &dest, &d);
    }
    i32::from(d.verdict == verdict::ALLOW)
}

/// The verdict and why. Every miss on the way falls to a deny or to a
/// default that user space chose; nothing falls open. A connect sent to
/// the egress broker has its destination rewritten in `ctx`.
#[inline(always)]
fn decide(ctx: &SockAddrContext, slot: u32, protocol: u32, port: u16, dest: &Dest) -> Decision {
    let stamp = GENERATION.get(0).copied().unwrap_or(0);
    let generation = stamp & 1;
    let mut d = Decision {
        slot,
        generation,
        verdict: verdict::DENY,
        reason: reason::REVOKED,
        rule_id: 0,
        flags: 0,
        name_id: 0,
    };
    let state = SLOT_STATE.get(slot).copied().unwrap_or(slot_state::REVOKED);
    if state & slot_state::REVOKED != 0 {
        return d;
    }
    d.reason = reason::NO_POLICY;
    let Some(policy) = SLOT_POLICY.get(slot_policy_index(generation, slot)) else {
        return d;
    };
    if policy.flags & slot_policy::PRESENT == 0 {
        return d;
    }

    let index = slot_policy_index(generation, slot);
    // The agent sets both tries of every slot before it switches to a
    // generation; none is there only in the moment after an upgrade
    // made the arrays anew.
    let (Some(dest_trie), Some(port_trie)) = (SLOT_DESTS.get(index), SLOT_PORTS.get(index)) else {
        return d;
    };
    let mut key = DestKey {
        family: FAMILY_V6,
        addr: dest.addr,
    };
    let mut bits = 128;
    if dest.v4 {
        let b = dest.v4_bytes();
        key = DestKey {
            family: FAMILY_V4,
            addr: [0; 16],
        };
        key.addr[0] = b[0];
        key.addr[1] = b[1];
        key.addr[2] = b[2];
        key.addr[3] = b[3];
        bits = 32;
    }
    let tables = if policy.flags & slot_policy::NO_ADDRESS_RULES == 0 {
        dest_trie.get(&Key::new(DEST_FIXED_BITS + bits, key))
    } else {
        None
    };
    let ports = match (tables, protocol) {
        (Some(t), IPPROTO_TCP | IPPROTO_MPTCP) => Some(&t.tcp),
        (Some(t), IPPROTO_UDP) => Some(&t.udp),
        _ => None,
    };
    d.verdict = policy.default_verdict;
    d.rule_id = policy.default_rule;
    d.reason = if slot == UNKNOWN_SLOT {
        reason::UNKNOWN_WORKLOAD
    } else {
        reason::DEFAULT
    };
    if let Some(rule) = ports.and_then(|t| port_rule(t, port_trie, port)) {
        d.verdict = rule.verdict;
        d.rule_id = rule.rule_id;
        d.reason = reason::RULE;
    } else if d.reason == reason::DEFAULT {
        let at = Lookup {
            stamp,
            dest_trie,
            port_trie,
            protocol,
            port,
        };
        learned_rule(slot, &key, &at, &mut d);
    }
    if d.reason == reason::DEFAULT && d.verdict != verdict::ALLOW {
        grant_rule(slot, &key, bits, protocol, port, &mut d);
    }
    if d.verdict == verdict::BROKER {
        if d.flags & record_flags::LEARNED != 0 {
            egress::redirect(ctx, protocol, port, dest, &mut d);
        } else {
            // Only name classes are compiled with it: fail closed.
            d.verdict = verdict::DENY;
        }
    }
    if d.verdict != verdict::ALLOW {
        // Anything but allow is a deny. A broker that cannot take the
        // connect is no policy decision: audit mode does not lift it.
        d.verdict = verdict::DENY;
        let broker_failed = d.reason == reason::EGRESS_NOT_READY || d.reason == reason::EGRESS_V6;
        if policy.flags & slot_policy::AUDIT != 0 && !broker_failed {
            d.verdict = verdict::ALLOW;
            d.reason = reason::AUDIT_ALLOWED;
        }
    }
    d
}

type DestTrie = LpmTrie<DestKey, DestTables, { MAX_SET_DESTS as usize }>;

/// What the steps after the address tries look in: the generation's whole
/// value and the slot's tries of it, and the connect's protocol and port.
struct Lookup<'a> {
    stamp: u32,
    dest_trie: &'a DestTrie,
    port_trie: &'a PortTrie,
    protocol: u32,
    port: u16,
}

/// Step 7: a name rule of the slot for which a lookup of the slot's
/// learned this address, before its expiry. `key` is the address as the
/// tries are keyed.
#[inline(always)]
fn learned_rule(slot: u32, key: &DestKey, at: &Lookup, d: &mut Decision) {
    let learned_key = LearnedKey {
        slot,
        family: key.family,
        addr: key.addr,
    };
    // SAFETY: a plain value read from a map owned by this program; the
    // map is not preallocated, so an entry the agent replaces stays valid
    // until this program is done.
    let Some(learned) = (unsafe { LEARNED.get(&learned_key) }) else {
        return;
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let mut i = 0;
    while i < LEARNED_INLINE {
        let name = &learned.names[i];
        i += 1;
        if name.expiry_ns <= now {
            continue;
        }
        // The entry's own copy of the class's tables when it is of this
        // generation, else the class's entry in the slot's trie.
        let tables = if name.generation != 0 && name.generation == at.stamp {
            Some(&name.tables)
        } else {
            let class = DestKey {
                family: FAMILY_NAME,
                addr: name.class,
            };
            at.dest_trie.get(&Key::new(DEST_FIXED_BITS + 128, class))
        };
        let ports = match (tables, at.protocol) {
            (Some(t), IPPROTO_TCP | IPPROTO_MPTCP) => &t.tcp,
            (Some(t), IPPROTO_UDP) => &t.udp,
            _ => continue,
        };
        if let Some(rule) = port_rule(ports, at.port_trie, at.port) {
            d.verdict = rule.verdict;
            d.rule_id = rule.rule_id;
            d.reason = reason::RULE;
            d.flags = record_flags::LEARNED;
            d.name_id = name.name_id;
            return;
        }
    }
}

/// Step 8: a grant of the slot, not expired, whose destination, protocols
/// and ports cover the connect. `key` is the address as the tries are
/// keyed, `bits` its length.
#[inline(always)]
fn grant_rule(slot: u32, key: &DestKey, bits: u32, protocol: u32, port: u16, d: &mut Decision) {
    let wanted = match protocol {
        IPPROTO_TCP | IPPROTO_MPTCP => grant_protocols::TCP,
        IPPROTO_UDP => grant_protocols::UDP,
        _ => return,
    };
    let grant_key = GrantKey {
        slot,
        family: key.family,
        addr: key.addr,
    };
    let Some(grants) = GRANTS.get(&Key::new(GRANT_FIXED_BITS + bits, grant_key)) else {
        return;
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let mut i = 0;
    while i < GRANT_INLINE {
        let g = &grants.grants[i];
        i += 1;
        if g.expiry_boot_ns > now && g.protocols & wanted != 0 && g.first <= port && port <= g.last
        {
            d.verdict = verdict::ALLOW;
            d.reason = reason::GRANT;
            d.rule_id = g.id;
            return;
        }
    }
}

/// The rule of `table` that covers `port`: in the table's own ranges, or
/// in the rule set's port trie.
#[inline(always)]
fn port_rule(table: &PortTable, trie: &PortTrie, port: u16) -> Option<RuleVerdict> {
    if table.count != 0 {
        let mut i = 0;
        while i < INLINE_RANGES {
            let r = &table.ranges[i];
            if (i as u32) < table.count && r.first <= port && port <= r.last {
                return Some(RuleVerdict {
                    verdict: r.verdict,
                    rule_id: r.rule_id,
                });
            }
            i += 1;
        }
        return None;
    }
    if table.table == NO_TABLE {
        return None;
    }
    let key = PortKey {
        table: table.table,
        port: port.to_be_bytes(),
        _pad: [0; 2],
    };
    trie.get(&Key::new(PORT_FIXED_BITS + 16, key)).copied()
}

/// The identity slot `cgroup` is bound to: from its index entry when the
/// entry is that cgroup's, else from the hash; [`UNKNOWN_SLOT`] when
/// neither holds it, or when its binding has an expiry that has passed.
#[inline(always)]
pub(crate) fn slot_of(cgroup: u64) -> u32 {
    let indexed = IDENTITY_INDEX
        .get_ptr(identity_index::position(cgroup))
        // SAFETY: a pointer into the array, valid for the call; one
        // aligned 8-byte load, which the agent's stores never tear.
        .and_then(|entry| identity_index::slot(unsafe { read_volatile(entry) }, cgroup));
    if let Some(slot) = indexed {
        return slot;
    }
    // SAFETY: a plain value read from a map owned by this program.
    match unsafe { IDENTITIES.get(&cgroup) }.copied() {
        Some(value) if value & binding::EXPIRES != 0 => {
            // SAFETY: as above; helper without arguments.
            let live = unsafe { BINDING_EXPIRY.get(&cgroup) }
                .is_some_and(|end| *end > unsafe { bpf_ktime_get_boot_ns() });
            if live {
                binding::slot(value)
            } else {
                UNKNOWN_SLOT
            }
        }
        Some(slot) => slot,
        None => UNKNOWN_SLOT,
    }
}

/// Whether this allow decision is one of the sample the agent asked for.
#[inline(always)]
fn sampled() -> bool {
    let threshold = EVENT_SETTINGS.get(0).map_or(0, |s| s.allow_sample);
    // SAFETY: helper without arguments.
    threshold != 0 && u64::from(unsafe { bpf_get_prandom_u32() }) < threshold
}

/// Writes the decision record into the ring buffer, or counts it as
/// dropped when the buffer is full.
#[inline(always)]
fn report(hook: u32, cgroup: u64, protocol: u32, port: u16, dest: &Dest, d: &Decision) {
    let Some(mut entry) = EVENTS.reserve::<DecisionRecord>(0) else {
        if let Some(drops) = EVENT_DROPS.get_ptr_mut(0) {
            // SAFETY: this CPU's own slot; no other program runs on it
            // meanwhile.
            unsafe { *drops += 1 };
        }
        return;
    };
    let record = entry.as_mut_ptr();
    // SAFETY: `record` points at reserved ring-buffer memory of the
    // record's size; every field is written before the entry is submitted.
    // The helpers take no arguments, or a buffer of the size they are told.
    unsafe {
        (*record).ktime_ns = bpf_ktime_get_ns();
        (*record).boot_ns = bpf_ktime_get_boot_ns();
        (*record).cgroup_id = cgroup;
        (*record).pid_tgid = bpf_get_current_pid_tgid();
        (*record).uid_gid = bpf_get_current_uid_gid();
        (*record).slot = d.slot;
        (*record).generation = d.generation;
        (*record).hook = hook;
        (*record).protocol = protocol;
        (*record).verdict = d.verdict;
        (*record).reason = d.reason;
        (*record).rule_id = d.rule_id;
        (*record).flags = dest.flags | d.flags;
        (*record).name_id = d.name_id;
        (*record)._pad = 0;
        (*record).port = u32::from(port);
        (*record).layout = RECORD_LAYOUT;
        (*record).addr = dest.addr;
        let comm = addr_of_mut!((*record).comm);
        if bpf_get_current_comm(comm.cast(), (*record).comm.len() as u32) != 0 {
            (*record).comm = [0; 16];
        }
    }
    entry.submit(0);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
