//! The egress broker's kernel half: a TCP connect that a credential rule
//! decided ([`verdict::BROKER`]) is sent to the agent's broker at a
//! loopback address that names the caller's identity slot, on the
//! broker's port for the port asked. See `idgate-common`, step 7.

use aya_ebpf::{
    helpers::generated::bpf_get_netns_cookie,
    macros::map,
    maps::{Array, SockHash},
    programs::SockAddrContext,
};
use core::ffi::c_void;
use idgate_common::{EgressSettings, reason, verdict};

use crate::dns::{DNS_SETTINGS, MAX_NAMESPACES, listening, to_slot_address};
use crate::{Decision, Dest, IPPROTO_MPTCP, IPPROTO_TCP};

#[map(name = "IDG_EGRESS_SETTINGS")]
static EGRESS_SETTINGS: Array<EgressSettings> = Array::pinned(1, 0);

/// Network-namespace cookie -> the broker's listening TCP socket there.
/// The kernel removes an entry when its socket closes, so while no broker
/// listens a brokered connect is denied at once.
#[map(name = "IDG_EGRESS_NETNS")]
static EGRESS_NETNS: SockHash<u64> = SockHash::pinned(MAX_NAMESPACES, 0);

const HTTPS: u16 = 443;
const HTTP: u16 = 80;

/// Carries out a [`verdict::BROKER`] decision `d` (of a name rule): a
/// TCP connect to port 443 or 80 goes to the broker (allowed, reason
/// [`reason::BROKERED`]); when it cannot, or for anything else, `d`
/// becomes a deny.
#[inline(always)]
pub fn redirect(ctx: &SockAddrContext, protocol: u32, port: u16, dest: &Dest, d: &mut Decision) {
    d.verdict = verdict::DENY;
    if protocol != IPPROTO_TCP && protocol != IPPROTO_MPTCP {
        return;
    }
    if !dest.v4 {
        d.reason = reason::EGRESS_V6;
        return;
    }
    d.reason = reason::EGRESS_NOT_READY;
    let (Some(egress), Some(dns)) = (EGRESS_SETTINGS.get(0), DNS_SETTINGS.get(0)) else {
        return;
    };
    if egress.enabled == 0 || dns.enabled == 0 {
        return;
    }
    let to_port = match port {
        HTTPS => egress.tls_port,
        HTTP => egress.http_port,
        _ => return,
    };
    // SAFETY: the hook's context, valid for the call.
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr as *mut c_void) };
    if !listening(&EGRESS_NETNS, netns) {
        return;
    }
    to_slot_address(ctx, dest, dns.net, d.slot, to_port);
    d.verdict = verdict::ALLOW;
    d.reason = reason::BROKERED;
}
