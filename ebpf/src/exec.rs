//! `raw_tracepoint/sched_process_exec`: tells the agent that a process in
//! the scope became another program, so its cgroup is attested again. Not
//! attached to the scope, so it checks the scope itself.

use aya_ebpf::{
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_pid_tgid,
    },
    macros::{map, raw_tracepoint},
    maps::{Array, RingBuf},
    programs::RawTracePointContext,
};
use idgate_common::{EXEC_RING_BYTES, ExecNotice, Scope};

#[map(name = "IDG_SCOPE")]
static SCOPE: Array<Scope> = Array::pinned(1, 0);

#[map(name = "IDG_EXEC_NOTICES")]
static EXEC_NOTICES: RingBuf = RingBuf::pinned(EXEC_RING_BYTES, 0);

/// Whether the current task's cgroup is the scope or below it.
#[inline(always)]
fn in_scope() -> bool {
    let Some(scope) = SCOPE.get(0) else {
        return false;
    };
    // SAFETY: helper taking a plain integer.
    scope.cgroup_id != 0
        && unsafe { bpf_get_current_ancestor_cgroup_id(scope.level as i32) } == scope.cgroup_id
}

/// A full ring buffer loses the notice; the agent's periodic resync
/// covers it.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn idgate_exec(_ctx: RawTracePointContext) -> i32 {
    if !in_scope() {
        return 0;
    }
    // SAFETY: helpers without arguments.
    let notice = unsafe {
        ExecNotice {
            cgroup_id: bpf_get_current_cgroup_id(),
            tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
            _pad: 0,
        }
    };
    // A full buffer is not an error here (see above).
    let _ = EXEC_NOTICES.output::<ExecNotice>(&notice, 0);
    0
}
