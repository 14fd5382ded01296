//! `quiesce` in the controllers: the guest agent of a VM, the conditions that
//! record a freeze, and the thaw an agent owes a guest it may have left
//! frozen (it crashed between freeze and thaw).
//!
//! `GuestFrozen=True` is written *before* the freeze and cleared after the
//! thaw; any reconcile that finds it True (after a restart, a failed status
//! write) thaws the VM first. Thawing a guest that is not frozen is a no-op.

use std::time::Duration;

use cairn_api::common::QuiesceStatus;
use cairn_api::conditions::NewCondition;
use cairn_api::{APPLICATION_CONSISTENT_CONDITION, Condition, GUEST_FROZEN_CONDITION};
use tracing::{info, warn};

use kube::runtime::controller::Action;
use kube::{Api, Resource};
use serde::de::DeserializeOwned;

use super::status::{cache_is_current, cond};
use super::{Context, ControllerError};
use crate::inventory::VmRef;
use crate::qga::{GuestAgent, QgaError, QuiesceReport, socket_beside};

/// The guest agent of `vm`, beside its QMP socket.
pub fn guest_agent(ctx: &Context, vm: &VmRef) -> GuestAgent {
    GuestAgent::new(
        vm.to_string(),
        socket_beside(&vm.socket),
        ctx.config.quiesce_timeout,
    )
}

/// Set before the freeze: an agent that restarts thaws the guest.
pub fn freezing() -> NewCondition<'static> {
    cond(
        GUEST_FROZEN_CONDITION,
        true,
        "Freezing",
        "Cairn is freezing the guest's filesystems for this operation; if the agent stops before the thaw, it thaws them when it restarts",
    )
}

/// The conditions and status after an operation that may have been quiesced.
/// `requested`: the spec asked for `quiesce`; `report`: what the freeze did
/// (`None` when it did not run, e.g. the agent re-attached to a running job).
pub fn outcome(
    requested: bool,
    report: Option<&QuiesceReport>,
) -> (Vec<NewCondition<'static>>, Option<QuiesceStatus>) {
    if !requested {
        return (
            vec![cond(
                APPLICATION_CONSISTENT_CONDITION,
                false,
                "NotRequested",
                "crash-consistent: taken without freezing the guest's filesystems (spec.quiesce is false)",
            )],
            None,
        );
    }
    let Some(r) = report else {
        return (
            vec![
                thawed("no freeze is held"),
                cond(
                    APPLICATION_CONSISTENT_CONDITION,
                    false,
                    "NotRecorded",
                    "the agent restarted during the operation and cannot tell whether the guest was frozen at its instant",
                ),
            ],
            None,
        );
    };
    let ms = r.frozen_for.as_millis() as i64;
    let mut conds = vec![cond(
        APPLICATION_CONSISTENT_CONDITION,
        true,
        "Quiesced",
        format!(
            "the guest agent froze {} filesystem(s) for {ms} ms around the instant",
            r.frozen_filesystems
        ),
    )];
    conds.push(match &r.thaw_error {
        None => thawed("the guest's filesystems were thawed"),
        // Stays True: the next reconcile keeps trying to thaw.
        Some(e) => cond(
            GUEST_FROZEN_CONDITION,
            true,
            "ThawFailed",
            format!("the thaw failed ({e}); Cairn keeps retrying"),
        ),
    });
    (
        conds,
        Some(QuiesceStatus {
            frozen_filesystems: r.frozen_filesystems as i64,
            frozen_milliseconds: ms,
        }),
    )
}

/// The conditions after a freeze that failed (the operation did not run; a
/// thaw was sent).
pub fn refused(e: &QgaError) -> Vec<NewCondition<'static>> {
    vec![
        thawed("the freeze failed; a thaw was sent"),
        cond(
            APPLICATION_CONSISTENT_CONDITION,
            false,
            e.reason(),
            e.to_string(),
        ),
    ]
}

/// Why `quiesce` cannot apply to stopped VM `vm` (condition reason, message).
pub fn stopped(vm: &str) -> (&'static str, String) {
    (
        "QuiesceUnavailable",
        format!(
            "quiesce needs the guest agent of a running guest, and VM {vm} is stopped; a stopped VM's images need no freeze: retry without quiesce"
        ),
    )
}

/// The conditions after an operation with `quiesce` failed: a freeze error
/// (the operation did not run) or a later failure (the thaw already ran).
pub fn after_failure(requested: bool, error: Option<&QgaError>) -> Vec<NewCondition<'static>> {
    match (requested, error) {
        (false, _) => Vec::new(),
        (true, Some(e)) => refused(e),
        (true, None) => vec![thawed("the operation failed; the guest was thawed")],
    }
}

/// The guest agent error inside a backup error, if that is what it is.
pub fn backup_quiesce_error(e: &crate::backup::BackupError) -> Option<&QgaError> {
    match e {
        crate::backup::BackupError::Quiesce(q) => Some(q),
        _ => None,
    }
}

fn thawed(message: &str) -> NewCondition<'static> {
    cond(GUEST_FROZEN_CONDITION, false, "Thawed", message.to_string())
}

/// When `conditions` say Cairn may have left `vm` frozen (an agent stopped
/// between freeze and thaw, or a status write failed), thaws it before
/// anything else and records the thaw with `record`. Returns the action to
/// end the reconcile with, or `None` to carry on.
pub async fn thaw_first<K>(
    ctx: &Context,
    api: &Api<K>,
    cached: &K,
    conditions: &[Condition],
    vm: Option<&VmRef>,
    record: impl AsyncFnOnce(Vec<Condition>) -> Result<(), kube::Error>,
) -> Result<Option<Action>, ControllerError>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    if !cairn_api::conditions::is_true(conditions, GUEST_FROZEN_CONDITION) {
        return Ok(None);
    }
    if !cache_is_current(api, cached).await? {
        // Our own thaw record may not have reached the cache yet.
        return Ok(Some(Action::requeue(Duration::from_millis(500))));
    }
    let done = match vm {
        // No QEMU on this node any more: no guest left frozen.
        None => thawed("the VM is not running: nothing is frozen"),
        Some(vm) => match guest_agent(ctx, vm).thaw().await {
            Ok(n) => {
                info!(vm = %vm, filesystems = n, "thawed a guest a quiesce had left frozen");
                thawed(&format!(
                    "thawed {n} filesystem(s) left frozen by an interrupted quiesce"
                ))
            }
            Err(e @ QgaError::Unavailable { .. }) => {
                warn!(vm = %vm, error = %e, "no guest agent to thaw with");
                thawed(&format!("no guest agent answers any more: {e}"))
            }
            Err(e) => {
                warn!(vm = %vm, error = %e, "cannot thaw yet");
                return Ok(Some(Action::requeue(Duration::from_secs(2))));
            }
        },
    };
    let generation = cached.meta().generation;
    record(super::status::agent_conditions(
        conditions,
        &[done],
        generation,
    ))
    .await?;
    Ok(Some(Action::requeue(Duration::from_millis(500))))
}
