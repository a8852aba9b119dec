//! One control request, one response, against the rules core: what the daemon loop does
//! with a call it answers itself (`status` and `events` also need the store, and are
//! answered beside it). The one effect, putting a registration's processes in the kernel
//! map, is passed in as `watch`, so the fuzz tests run this very code on a fake world.

use anyhow::{Result, anyhow};

use crate::{
    procs::{ProcInfo, Procs},
    protocol::{Request, Response},
    report,
    rules::{Clock, Core, Registration},
};

/// Puts a checked registration's processes in the kernel map (`fresh`: the root was just
/// started and has no descendants) and returns those verified to be watched.
pub type Watch<'a> = dyn FnMut(&Core, &Registration, bool) -> Result<Vec<ProcInfo>> + 'a;

/// The response to `request`. The actions the core queued are the caller's to settle.
pub fn respond(
    core: &mut Core,
    request: Request,
    procs: &dyn Procs,
    clock: &Clock,
    watch: &mut Watch<'_>,
) -> Response {
    let result = match request {
        Request::Register {
            pid,
            analysis_id,
            limits,
            fresh,
        } => {
            // Checked by the rules, put in the kernel map by the effects, taken in by
            // the rules: a refused registration changes nothing.
            core.check_register(pid, &analysis_id, &limits, 0, procs)
                .and_then(|registration| {
                    let watched = watch(core, &registration, fresh)?;
                    core.adopt(registration, &watched, clock)
                })
        }
        Request::Unregister { pid, analysis_id } => {
            core.unregister(pid, analysis_id.as_deref(), clock)
        }
        Request::DumpTree { analysis_id } => {
            report::dump_tree(core, analysis_id.as_deref(), procs, clock)
        }
        // The loop answers these through the store; never a panic in the daemon.
        Request::Events { .. } | Request::Status => Err(anyhow!(
            "internal: this request is answered by the daemon loop"
        )),
        Request::Stall { .. } => Err(anyhow!(
            "stall is a test-only fault: start the daemon with --test-faults to use it"
        )),
        Request::Fault { .. } => Err(anyhow!(
            "fault is a test-only request: start the daemon with --test-faults to use it"
        )),
    };
    match result {
        Ok(reply) => Response::Ok(reply),
        Err(err) => Response::Error(format!("{err:#}")),
    }
}
