//! Every long-lived task the daemon starts, by name, in one `JoinSet`. The daemon loop
//! awaits [`Tasks::ended`]: a task that returns or panics stops the daemon with one
//! error line naming it and the cause (systemd restarts the daemon; the pinned kernel
//! programs keep tracking meanwhile). None of these tasks is meant to end while the
//! daemon runs.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::Result;
use tokio::task::{Id, JoinSet};

tokio::task_local! {
    /// The supervised task being polled: a panic inside it is reported by the
    /// supervisor (with the task's name), not by the panic hook.
    static TASK: &'static str;
}

/// Where and why a supervised task panicked, by task name, for the supervisor's line.
static PANICS: Mutex<BTreeMap<&'static str, String>> = Mutex::new(BTreeMap::new());

/// Installs (once) a panic hook that leaves the report of a panic inside a supervised
/// task to the supervisor: one line naming the task, the place and the message. Any
/// other panic is reported as before.
pub fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let Ok(name) = TASK.try_with(|name| *name) else {
                return previous(info);
            };
            let place = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let report = format!("panicked{place}: {}", payload_text(info.payload()));
            let mut panics = PANICS.lock().unwrap_or_else(|p| p.into_inner());
            panics.insert(name, report);
        }));
    });
}

fn payload_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_string()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "(no message)".to_string()
    }
}

/// A supervised task that ended, and why.
#[derive(Debug)]
pub struct Ended {
    pub name: &'static str,
    pub cause: String,
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the {} task {}", self.name, self.cause)
    }
}

/// As an error: the daemon stopped because a task ended; already logged (main prints
/// nothing more).
impl std::error::Error for Ended {}

/// Sleeps until `at`, or forever when nothing is scheduled (the daemon loop's and the
/// database task's timers).
pub(crate) async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[derive(Default)]
pub struct Tasks {
    set: JoinSet<Result<()>>,
    names: HashMap<Id, &'static str>,
}

impl Tasks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts `task` under `name`.
    pub fn spawn(
        &mut self,
        name: &'static str,
        task: impl Future<Output = Result<()>> + Send + 'static,
    ) {
        let handle = self.set.spawn(TASK.scope(name, task));
        self.names.insert(handle.id(), name);
    }

    /// The next task to end and why; pending for as long as none does.
    pub async fn ended(&mut self) -> Ended {
        match self.set.join_next_with_id().await {
            Some(joined) => self.describe(joined),
            None => std::future::pending().await,
        }
    }

    fn describe(&mut self, joined: Result<(Id, Result<()>), tokio::task::JoinError>) -> Ended {
        let id = match &joined {
            Ok((id, _)) => *id,
            Err(err) => err.id(),
        };
        let name = self.names.remove(&id).unwrap_or("unnamed");
        let cause = match joined {
            Ok((_, Ok(()))) => "returned, which it never should".to_string(),
            Ok((_, Err(err))) => format!("failed: {err:#}"),
            Err(err) if err.is_panic() => {
                let hooked = PANICS
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(name);
                hooked.unwrap_or_else(|| format!("panicked: {}", payload_text(&err.into_panic())))
            }
            Err(_) => "was cancelled".to_string(),
        };
        Ended { name, cause }
    }

    /// Waits, at most `within`, for the task `name` to end by itself (e.g. once its
    /// input is closed); true when it has (or had already). Others ending meanwhile are
    /// let go: the daemon is stopping.
    pub async fn finish(&mut self, name: &str, within: Duration) -> bool {
        if !self.names.values().any(|n| *n == name) {
            return true;
        }
        let wait = async {
            while let Some(joined) = self.set.join_next_with_id().await {
                let ended = self.describe(joined);
                if ended.name == name {
                    return;
                }
            }
        };
        tokio::time::timeout(within, wait).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_panics_or_returns_is_named_with_its_cause() {
        install_panic_hook();
        let mut tasks = Tasks::new();
        tasks.spawn("forever", std::future::pending());
        tasks.spawn("panicker", async {
            tokio::task::yield_now().await;
            panic!("told to");
        });
        let ended = tasks.ended().await;
        assert_eq!(ended.name, "panicker");
        assert!(
            ended.cause.starts_with("panicked at ") && ended.cause.ends_with(": told to"),
            "{}",
            ended.cause
        );
        tasks.spawn("failer", async { Err(anyhow::anyhow!("no more input")) });
        let ended = tasks.ended().await;
        assert_eq!(ended.to_string(), "the failer task failed: no more input");
        tasks.spawn("quitter", async { Ok(()) });
        assert!(tasks.finish("quitter", Duration::from_secs(5)).await);
        assert!(!tasks.finish("forever", Duration::from_millis(10)).await);
    }
}
