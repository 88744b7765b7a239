//! Which asyncio task each Python thread is stepping, for request tracing's coroutine identity.
//!
//! Why here: an asyncio server (uvicorn, aiohttp) serves many requests on one thread, so "the
//! request this thread read last" (thread causality) cannot say which one a database call was
//! made for. The task can: the interpreter's `_asyncio` module steps a task by resuming its
//! coroutine with `PyIter_Send(coro, ...)`, an exported C function (so a uprobe works on
//! distribution builds), and every socket write the task makes happens inside that call. Awaits
//! inside the coroutine resume theirs through the same function, so only the outermost call of a
//! thread names the task ([`PyStep`]); its return ends the step. [`crate::causality::on_turn`]
//! stamps the coroutine on a client socket's request start and a server socket's response start.
//!
//! A step begun before the probes were attached has no entry (its calls stay unstamped), and the
//! return probe fires only for calls whose entry it saw, so the depth stays exact.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use hopwatch_common::PyStep;

use crate::maps::PY_STEPS;

/// `PySendResult PyIter_Send(PyObject *iter, PyObject *arg, PyObject **presult)`.
#[uprobe]
pub fn py_send(ctx: ProbeContext) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    let Some(coro) = ctx.arg::<u64>(0) else { return 0 };
    match PY_STEPS.get_ptr_mut(tid) {
        // SAFETY: this thread's map value, valid while the program runs; only this thread writes
        // it.
        Some(s) => unsafe {
            if (*s).depth == 0 {
                (*s).coro = coro;
            }
            (*s).depth += 1;
        },
        None => {
            let _ = PY_STEPS.insert(tid, PyStep { coro, depth: 1 }, 0);
        }
    }
    0
}

/// `PyIter_Send`'s return.
#[uretprobe]
pub fn py_send_return(_ctx: RetProbeContext) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    if let Some(s) = PY_STEPS.get_ptr_mut(tid) {
        // SAFETY: as above. An entry evicted and made again inside a step starts at the depth it
        // saw: it never goes below zero.
        unsafe {
            if (*s).depth > 0 {
                (*s).depth -= 1;
            }
        }
    }
    0
}

/// The coroutine of the asyncio task thread `tid` is stepping; 0 when it is in none.
#[inline(always)]
pub fn current_coroutine(tid: u32) -> u64 {
    // SAFETY: map value, read at once.
    match unsafe { PY_STEPS.get(tid) } {
        Some(s) if s.depth > 0 => s.coro,
        _ => 0,
    }
}
