//! The one dispatch of a control request: [`route`] decides, for the daemon loop and
//! for the fuzz tests alike, which requests the rules core answers (and answers them),
//! which the loop answers from what only it holds (`status` and `events` need the store,
//! `overview` the loop's RSS history, the test faults the loop itself), and who may ask
//! for the test faults. The effects a registration needs are behind [`Watch`], so the
//! fuzz tests run this very code on a fake world.

use anyhow::Result;

use crate::{
    api::{
        protocol::{Reply, Request, Response, TestFault},
        report,
    },
    core::{Clock, Core, procs::Procs, runs::RunState},
    core::{Registered, Watch},
    store::EventFilter,
    vocab::{
        error::{Error, ErrorKind},
        limits::LimitOverrides,
        peer::Peer,
        process::ProcRef,
    },
};

/// The kind of an error when nothing in its chain names one (the rules core's errors
/// that carry no kind): a refusal, as it says no to the request and changes nothing.
/// Errors of the other kinds (not found, bad request) name theirs where they are made.
pub const UNTYPED: ErrorKind = ErrorKind::Refused;

/// Where a request is answered.
#[derive(Debug)]
pub enum Routed {
    /// By the rules core, now: this response.
    Answered(Response),
    /// By the loop, from the store and its own counters.
    Status,
    /// By the loop, once the ring is drained, from the store.
    Events(EventFilter),
    /// By the loop, from its RSS history.
    Overview,
    /// By the loop, once the run has ended and its records are stored.
    Wait(u64),
    /// A test fault the caller may arm: the loop answers, then stalls `ms`.
    Stall(u64),
    /// A test fault the caller may arm.
    Fault(TestFault),
}

/// Routes `peer`'s `request`: what the core answers is answered here; reads are open
/// to everyone who can connect; the test faults only to root and the admin group of a
/// daemon started with `--test-faults`.
pub fn route(
    core: &mut Core,
    request: Request,
    peer: &Peer,
    test_faults: bool,
    procs: &dyn Procs,
    clock: &Clock,
    effects: &mut dyn Watch,
) -> Routed {
    let faults_allowed = test_faults && core.is_admin(peer);
    match request {
        Request::Status => Routed::Status,
        Request::Events { filter } => Routed::Events(filter),
        Request::Overview => Routed::Overview,
        Request::Wait { run } => Routed::Wait(run),
        Request::Stall { ms } if faults_allowed => Routed::Stall(ms),
        Request::Fault { what } if faults_allowed => Routed::Fault(what),
        request => Routed::Answered(respond(core, request, peer, procs, clock, effects)),
    }
}

/// The response to `peer`'s `request`; the rules decide what it may do. The actions the
/// core queued are the caller's to settle.
fn respond(
    core: &mut Core,
    request: Request,
    peer: &Peer,
    procs: &dyn Procs,
    clock: &Clock,
    effects: &mut dyn Watch,
) -> Response {
    let result = match request {
        Request::Register {
            pid,
            analysis_id,
            limits,
            fresh,
        } => register(
            core,
            (pid, &analysis_id, &limits, fresh),
            peer,
            procs,
            clock,
            effects,
        ),
        Request::Launch {
            pid,
            analysis_id,
            limits,
        } => launch(
            core,
            (pid, &analysis_id, &limits),
            peer,
            procs,
            clock,
            effects,
        ),
        Request::Unregister { pid, analysis_id } => core
            .unregister(pid, analysis_id.as_deref(), peer, procs, clock)
            .map(|removed| Reply::Unregistered { removed }),
        Request::DumpTree { analysis_id } => {
            report::dump_tree(core, analysis_id.as_deref(), procs, clock)
        }
        // Routed to the loop by `route`: never a panic should that change.
        Request::Events { .. } | Request::Status | Request::Overview | Request::Wait { .. } => {
            Err(Error::new(
                ErrorKind::Internal,
                "internal: this request is answered by the daemon loop",
            )
            .into())
        }
        Request::Stall { .. } | Request::Fault { .. } if !core.is_admin(peer) => {
            Err(crate::core::admin_only(peer, "a test fault"))
        }
        // Refused, not a bad request: the same request is carried out by a daemon
        // started with --test-faults; this one's settings say no.
        Request::Stall { .. } => Err(Error::refused(
            "stall is a test-only fault: start the daemon with --test-faults to use it",
        )
        .into()),
        Request::Fault { .. } => Err(Error::refused(
            "fault is a test-only request: start the daemon with --test-faults to use it",
        )
        .into()),
    };
    match result {
        Ok(reply) => Response::Ok(reply),
        Err(err) => Response::failed(&err, UNTYPED),
    }
}

/// Checked by the rules, put in the kernel's map of launchers by the effects, taken in
/// by the rules: a refused launch changes nothing.
fn launch(
    core: &mut Core,
    (pid, analysis_id, limits): (u32, &str, &LimitOverrides),
    peer: &Peer,
    procs: &dyn Procs,
    clock: &Clock,
    effects: &mut dyn Watch,
) -> Result<Reply> {
    let registration = core.check_launch(pid, analysis_id, limits, peer, procs)?;
    effects.launch(&registration)?;
    Ok(registered(core.launch(registration, clock)))
}

/// Checked by the rules, put in the kernel map by the effects, taken in by the rules:
/// a refused registration changes nothing. A caller confined to its own processes has
/// the root's existing descendants checked before anything is put in the kernel map
/// (and each again as the walk watches it, which takes back what it put there should
/// one fail).
fn register(
    core: &mut Core,
    (pid, analysis_id, limits, fresh): (u32, &str, &LimitOverrides, bool),
    peer: &Peer,
    procs: &dyn Procs,
    clock: &Clock,
    effects: &mut dyn Watch,
) -> Result<Reply> {
    let registration = core.check_register(pid, analysis_id, limits, peer, procs)?;
    // `exec`'s process was just forked by the caller and has no descendants; and a
    // `fresh` claim never watches an existing one (only what it forks from now on).
    if registration.confined_to.is_some() && !fresh {
        let descendants = effects.descendants(registration.root.proc_ref())?;
        core.check_descendants(&registration, &descendants, procs)?;
    }
    let watched = {
        let core = &*core;
        let permit = |process: ProcRef| core.check_descendants(&registration, &[process], procs);
        effects.watch(&registration, fresh, &|pid| core.analysis_of(pid), &permit)?
    };
    Ok(registered(core.adopt(registration, &watched, clock)?))
}

/// The reply to a registration or launch taken in.
fn registered(taken: Registered) -> Reply {
    Reply::Registered {
        pid: taken.pid,
        analysis_id: taken.analysis_id,
        watched: taken.watched,
        run: taken.run,
    }
}

/// The answer to `wait` for run `run` as it stands, or None while it is running.
pub fn ended(run: u64, state: RunState) -> Option<Response> {
    match state {
        RunState::Running => None,
        RunState::Ended(kills) => Some(Response::Ok(Reply::Ended { run, kills })),
        RunState::Unknown => Some(Response::error(
            ErrorKind::NotFound,
            format!(
                "run {run} is not known to this daemon: it never was, or it ended long ago \
                 (see `watchdog-user events`)"
            ),
        )),
    }
}
