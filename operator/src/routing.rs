//! What checkpoints and backups share: finding the VM's node, the routing
//! metadata (labels and finalizer), the operator's conditions, the deletion
//! handshake with the agent, and the calls that write them.
//!
//! The pure parts ([`plan_deletion`], [`routing_metadata`], [`operator_conditions`])
//! are tested here; the async parts only issue the writes they decided.

use std::collections::BTreeMap;
use std::fmt::Debug;

use cairn_api::conditions::{self, LifecycleStatus, NewCondition};
use cairn_api::{Condition, NODE_LABEL, OPERATOR_MANAGER, QemuInstance, VM_LABEL};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::context::Context;
use crate::error::{Error, Result};

/// Condition the operator owns: the object was accepted and routed, or rejected.
pub const ACCEPTED: &str = "Accepted";
/// Condition the agent writes once a deleted object's node-side state is gone.
pub const CLEANED_UP: &str = "CleanedUp";
/// Reason of a rejection because the QemuInstance does not exist.
pub const REASON_VM_NOT_FOUND: &str = "VirtualMachineNotFound";

/// A VM's arrival revives the objects rejected for its absence through the
/// QemuInstance watch; this re-check is the safety net for a missed event.
pub const RECHECK_MISSING_VM: std::time::Duration = std::time::Duration::from_secs(300);
/// Reason of `Accepted=True`.
pub const REASON_ROUTED: &str = "Routed";

/// Why the operator rejected an object before routing it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// Stable CamelCase reason.
    pub reason: &'static str,
    /// What is wrong and what to do.
    pub message: String,
}

impl Rejection {
    /// The VM `vm` has no QemuInstance in `namespace`.
    pub fn vm_not_found(vm: &str, namespace: &str) -> Self {
        Self {
            reason: REASON_VM_NOT_FOUND,
            message: format!(
                "QemuInstance {vm:?} does not exist in namespace {namespace:?}: start the VM with its QMP socket at <socket-dir>/{namespace}/{vm}.sock on a node running cairn-agent, or fix spec.virtualMachine; this object is routed as soon as the VM appears"
            ),
        }
    }
}

/// Outcome of resolving the VM of an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// The VM runs on this node.
    Node(String),
    /// The QemuInstance exists but has no node yet; wait for the agent.
    Unplaced,
    /// No QemuInstance of that name in the namespace.
    Missing,
}

/// Where the VM `qemu` runs.
pub fn placement(qemu: Option<&QemuInstance>) -> Placement {
    match qemu {
        None => Placement::Missing,
        Some(q) => match q.status.as_ref().and_then(|s| s.node_name.clone()) {
            Some(node) if !node.is_empty() => Placement::Node(node),
            _ => Placement::Unplaced,
        },
    }
}

/// Whether the operator rejected the object before routing (`Accepted=False`):
/// only then may it rewrite the phase of an object that is not new.
pub fn rejected_by_operator(conds: &[Condition]) -> bool {
    conditions::find(conds, ACCEPTED).is_some_and(|c| c.status == "False")
}

/// Whether the object was routed to a node (the agent owns its phase from then on).
pub fn is_routed<K: Resource>(obj: &K) -> bool {
    obj.labels().contains_key(NODE_LABEL)
}

/// Conditions the operator writes, with `lastTransitionTime` kept from `existing`.
/// Returns them and whether any of them differs from `existing`.
pub fn operator_conditions(
    existing: &[Condition],
    wanted: Vec<NewCondition<'_>>,
    generation: Option<i64>,
    now: Timestamp,
) -> (Vec<Condition>, bool) {
    let mut all = existing.to_vec();
    let mut changed = false;
    let types: Vec<String> = wanted.iter().map(|c| c.type_.to_string()).collect();
    for c in wanted {
        changed |= conditions::set_condition(&mut all, c, generation, now);
    }
    all.retain(|c| types.contains(&c.type_));
    (all, changed)
}

/// Adds to `desired` (a status whose phase the operator writes) the kstatus
/// conditions and `observedGeneration` that go with that phase, keeping
/// `lastTransitionTime` from `existing`. Whoever writes the phase writes these
/// (ownership table in `cairn_api::conditions`), derived by the same function
/// the agent uses, so the two managers never disagree on them. Returns whether
/// they differ from what the object has.
pub fn with_lifecycle<S: LifecycleStatus>(
    desired: &mut S,
    existing: &[Condition],
    existing_generation: Option<i64>,
    generation: Option<i64>,
    now: Timestamp,
) -> bool {
    let (lifecycle, phase) = desired.lifecycle();
    *desired.observed_generation_mut() = generation;
    let changed = existing_generation != generation;
    // After a rejection `Ready` is the operator's own; when this apply drops
    // it (the VM appeared), the messages must not repeat the old rejection.
    let previous: Vec<Condition> = existing
        .iter()
        .filter(|c| c.type_ != cairn_api::condition_types::READY || !rejected_by_operator(existing))
        .cloned()
        .collect();
    conditions::set_lifecycle(
        desired.conditions_mut(),
        &previous,
        lifecycle,
        phase,
        generation,
        now,
    ) || changed
}

/// `Accepted=True` for a routed object.
pub fn accepted(node: &str, vm: &str) -> NewCondition<'static> {
    NewCondition {
        type_: ACCEPTED,
        status: true,
        reason: REASON_ROUTED,
        message: format!("routed to the agent on node {node:?}, where VM {vm:?} runs"),
    }
}

/// The `Routed` event of a routing, if a person needs one: when the object was
/// rejected before (the Warning it got is resolved) or its VM moved to another
/// node. A first routing publishes nothing: `Accepted=True` (reason `Routed`,
/// message naming the node) says it, and one Event per object doubled the API
/// writes of a burst of creates.
pub fn routed_event(
    existing: &[Condition],
    old_node: Option<&str>,
    node: &str,
    vm: &str,
) -> Option<(EventType, &'static str, String)> {
    if rejected_by_operator(existing) {
        Some((
            EventType::Normal,
            REASON_ROUTED,
            format!("VM {vm} found; routed to node {node} where it runs"),
        ))
    } else if old_node.is_some_and(|o| o != node) {
        Some((
            EventType::Normal,
            REASON_ROUTED,
            format!("VM {vm} moved to node {node}; routed there"),
        ))
    } else {
        None
    }
}

/// `Accepted=False` and `Ready=False` for a rejected object.
pub fn rejected(r: &Rejection) -> Vec<NewCondition<'static>> {
    vec![
        NewCondition {
            type_: ACCEPTED,
            status: false,
            reason: r.reason,
            message: r.message.clone(),
        },
        NewCondition {
            type_: cairn_api::condition_types::READY,
            status: false,
            reason: r.reason,
            message: r.message.clone(),
        },
    ]
}

/// The metadata merge patch that routes `obj` to `node`: labels and finalizer.
/// `None` when everything is already in place. Carries the resourceVersion, so
/// a concurrent finalizer change makes it fail with a conflict instead of losing it.
pub fn routing_metadata<K: Resource>(
    obj: &K,
    node: &str,
    vm: &str,
    finalizer: &str,
) -> Option<serde_json::Value> {
    let labels = obj.labels();
    let has_labels = labels.get(NODE_LABEL).map(String::as_str) == Some(node)
        && labels.get(VM_LABEL).map(String::as_str) == Some(vm);
    let has_finalizer = obj.finalizers().iter().any(|f| f == finalizer);
    if has_labels && has_finalizer {
        return None;
    }
    let mut finalizers = obj.finalizers().to_vec();
    if !has_finalizer {
        finalizers.push(finalizer.to_string());
    }
    let new_labels: BTreeMap<&str, &str> = [(NODE_LABEL, node), (VM_LABEL, vm)].into();
    Some(json!({
        "metadata": {
            "resourceVersion": obj.resource_version(),
            "labels": new_labels,
            "finalizers": finalizers,
        }
    }))
}

/// What to do with an object whose deletion was requested.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeletionPlan {
    /// Our finalizer is not (or no longer) on the object.
    Nothing,
    /// Remove our finalizer: nothing is, or nothing remains, to clean on a node.
    RemoveFinalizer(DeletionReason),
    /// Wait for the agent to write `CleanedUp=True`.
    WaitForAgent,
}

/// Why the finalizer can go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeletionReason {
    /// The agent wrote `CleanedUp=True`.
    CleanedUp,
    /// The object was never routed, so no node holds anything of it.
    NeverRouted,
    /// The VM's QemuInstance is gone: no agent can ever clean up.
    VirtualMachineGone,
}

impl DeletionReason {
    /// A sentence for the `Deleted` event.
    pub fn message(self) -> &'static str {
        match self {
            Self::CleanedUp => "the agent cleaned up on the node; finalizer removed",
            Self::NeverRouted => "never routed to a node, nothing to clean up; finalizer removed",
            Self::VirtualMachineGone => {
                "the VM's QemuInstance no longer exists, nothing can be cleaned up; finalizer removed"
            }
        }
    }
}

/// The finalizer handshake: the operator removes its finalizer only once the
/// agent reported `CleanedUp=True`, or when no agent can ever clean up.
pub fn plan_deletion(
    has_finalizer: bool,
    cleaned_up: bool,
    routed: bool,
    vm_exists: bool,
) -> DeletionPlan {
    match (has_finalizer, cleaned_up, routed, vm_exists) {
        (false, ..) => DeletionPlan::Nothing,
        (true, true, _, _) => DeletionPlan::RemoveFinalizer(DeletionReason::CleanedUp),
        (true, false, false, _) => DeletionPlan::RemoveFinalizer(DeletionReason::NeverRouted),
        (true, false, true, false) => {
            DeletionPlan::RemoveFinalizer(DeletionReason::VirtualMachineGone)
        }
        (true, false, true, true) => DeletionPlan::WaitForAgent,
    }
}

/// Parameters of the operator's merge patches: the operator's field manager,
/// so `managedFields` name `cairn-operator` as the owner of the routing labels
/// and finalizers (without one the API server records `unknown`).
pub fn merge_params() -> PatchParams {
    PatchParams {
        field_manager: Some(OPERATOR_MANAGER.into()),
        ..Default::default()
    }
}

/// Parameters of the operator's creates, under its field manager (see [`merge_params`]).
pub fn create_params() -> PostParams {
    PostParams {
        field_manager: Some(OPERATOR_MANAGER.into()),
        ..Default::default()
    }
}

/// Namespace of a namespaced object.
pub fn namespace_of<K: Resource>(obj: &K) -> Result<String> {
    obj.namespace()
        .ok_or_else(|| Error::MissingNamespace(obj.name_any()))
}

/// Applies the metadata merge patch `patch` to `obj`. `resource_version` (when
/// given) replaces the one in the patch: the version after the operator's own
/// status write, which happens first.
pub async fn patch_metadata<K>(
    api: &Api<K>,
    obj: &K,
    patch: &serde_json::Value,
    resource_version: Option<String>,
) -> Result<()>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let mut patch = patch.clone();
    if let Some(rv) = resource_version {
        patch["metadata"]["resourceVersion"] = json!(rv);
    }
    api.patch(&obj.name_any(), &merge_params(), &Patch::Merge(&patch))
        .await
        .map_err(Error::kube(format!("labelling {}", obj.name_any())))?;
    Ok(())
}

/// When to look again at an object whose routing write was skipped as in flight.
pub const RECHECK_ROUTING: std::time::Duration = std::time::Duration::from_secs(15);

/// How long a routing write of this process explains a cache that lacks it.
const ROUTING_WRITE_IN_FLIGHT: std::time::Duration = std::time::Duration::from_secs(10);

/// The routing metadata this process wrote, per object UID, until the cache
/// shows it. A reconcile woken by the operator's own status write runs on a
/// cache that has the status but not yet the labels written right after it;
/// patching again would fail with a conflict (the patch carries the cached
/// resourceVersion) and back off for seconds. 10,000 new checkpoints made
/// about 17,000 such conflicts.
#[derive(Default)]
pub struct WrittenRouting(
    std::sync::Mutex<std::collections::HashMap<String, (String, std::time::Instant)>>,
);

impl WrittenRouting {
    /// Whether the labels `fingerprint` of `uid` were written moments ago, so
    /// a cache without them is merely behind.
    pub fn in_flight(&self, uid: &str, fingerprint: &str) -> bool {
        let mut m = self.0.lock().expect("routing memo lock");
        match m.get(uid) {
            Some((f, at)) if f == fingerprint && at.elapsed() < ROUTING_WRITE_IN_FLIGHT => true,
            Some(_) => {
                m.remove(uid);
                false
            }
            None => false,
        }
    }

    /// Records a write of the labels `fingerprint` of `uid`.
    pub fn wrote(&self, uid: &str, fingerprint: String) {
        self.0
            .lock()
            .expect("routing memo lock")
            .insert(uid.to_string(), (fingerprint, std::time::Instant::now()));
    }

    /// The cache shows the object routed: nothing in flight.
    pub fn settled(&self, uid: &str) {
        self.0.lock().expect("routing memo lock").remove(uid);
    }
}

/// Writes the routing metadata `patch` of `obj` (see [`patch_metadata`]),
/// unless this reconcile wrote no status (`version` is `None`) and the cache
/// only lacks the same labels this process wrote moments ago. Returns whether
/// it skipped the write: the caller looks again later, in case the write it
/// relied on was undone.
pub async fn write_routing<K>(
    ctx: &Context,
    api: &Api<K>,
    obj: &K,
    patch: Option<&serde_json::Value>,
    version: Option<String>,
) -> Result<bool>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let uid = obj.meta().uid.clone().unwrap_or_default();
    let Some(patch) = patch else {
        ctx.routing_written.settled(&uid);
        return Ok(false);
    };
    let fingerprint = patch["metadata"]["labels"].to_string();
    if version.is_none() && ctx.routing_written.in_flight(&uid, &fingerprint) {
        tracing::debug!("routing labels written moments ago; the cache is behind");
        return Ok(true);
    }
    patch_metadata(api, obj, patch, version).await?;
    ctx.routing_written.wrote(&uid, fingerprint);
    Ok(false)
}

/// Writes the operator's status fields with server-side apply (manager `cairn-operator`, forced).
///
/// The status is written before the routing label, so the agent (which only sees
/// labelled objects) always finds `nodeName`, `parent` and `Accepted` in place.
/// The body carries `resource_version`, the version the plan was made from: if the
/// agent wrote status in between, the API server answers Conflict and the next
/// reconcile plans from fresh state, instead of this write forcing `phase` back to
/// Pending over the agent's Running. Returns the new resourceVersion.
pub async fn apply_status<K, S>(
    api: &Api<K>,
    name: &str,
    resource_version: Option<String>,
    status: &S,
) -> Result<Option<String>>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    S: Serialize,
{
    let body = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": {"resourceVersion": resource_version},
        "status": status,
    });
    let updated = api
        .patch_status(
            name,
            &PatchParams::apply(OPERATOR_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(Error::kube(format!("writing the status of {name}")))?;
    Ok(updated.resource_version())
}

/// Removes `finalizer` from `obj`. The merge patch carries the
/// resourceVersion, so a concurrent change of the list makes it fail with a
/// conflict and retry instead of clobbering another controller's finalizer.
pub async fn remove_finalizer<K>(api: &Api<K>, obj: &K, finalizer: &str) -> Result<()>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let remaining: Vec<&String> = obj
        .finalizers()
        .iter()
        .filter(|f| *f != finalizer)
        .collect();
    let patch = json!({
        "metadata": {"resourceVersion": obj.resource_version(), "finalizers": remaining}
    });
    match api
        .patch(&obj.name_any(), &merge_params(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(Error::kube(format!(
            "removing the finalizer of {}",
            obj.name_any()
        ))(e)),
    }
}

/// Publishes an event about `obj`; failures are logged, never fatal.
pub async fn publish<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    obj: &K,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action: reason.to_string(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
        tracing::warn!(%error, reason, "publishing an event failed");
    }
}

/// True when `obj` is being deleted.
pub fn deleting<K: Resource>(obj: &K) -> bool {
    obj.meta().deletion_timestamp.is_some()
}

/// The QemuInstance `vm` in `namespace`, from the cache.
pub fn find_vm(ctx: &Context, namespace: &str, vm: &str) -> Option<std::sync::Arc<QemuInstance>> {
    ctx.vms
        .get(&kube::runtime::reflector::ObjectRef::new(vm).within(namespace))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_api::VirtualMachineCheckpoint;

    #[test]
    fn a_routing_write_in_flight_is_remembered_until_settled_or_changed() {
        let m = WrittenRouting::default();
        assert!(!m.in_flight("u1", "a"));
        m.wrote("u1", "a".into());
        assert!(m.in_flight("u1", "a"));
        // Other labels (the VM moved): not what was written, write again.
        assert!(!m.in_flight("u1", "b"));
        assert!(!m.in_flight("u1", "a"), "a mismatch forgets the entry");
        m.wrote("u1", "a".into());
        m.settled("u1");
        assert!(!m.in_flight("u1", "a"));
    }

    #[test]
    fn deletion_waits_only_for_routed_objects_of_live_vms() {
        use DeletionPlan::*;
        use DeletionReason::*;
        assert_eq!(plan_deletion(false, false, true, true), Nothing);
        assert_eq!(
            plan_deletion(true, true, true, true),
            RemoveFinalizer(CleanedUp)
        );
        assert_eq!(
            plan_deletion(true, false, false, true),
            RemoveFinalizer(NeverRouted)
        );
        assert_eq!(
            plan_deletion(true, false, true, false),
            RemoveFinalizer(VirtualMachineGone)
        );
        assert_eq!(plan_deletion(true, false, true, true), WaitForAgent);
    }

    #[test]
    fn routing_metadata_adds_labels_and_finalizer_once() {
        let mut cp = VirtualMachineCheckpoint::new("c1", Default::default());
        cp.metadata.resource_version = Some("7".into());
        cp.metadata.finalizers = Some(vec!["other/keep".into()]);
        let patch = routing_metadata(&cp, "node-1", "vm1", "cairn.dev/bitmaps").unwrap();
        assert_eq!(patch["metadata"]["resourceVersion"], "7");
        assert_eq!(
            patch["metadata"]["finalizers"],
            json!(["other/keep", "cairn.dev/bitmaps"])
        );
        assert_eq!(patch["metadata"]["labels"][NODE_LABEL], "node-1");
        cp.metadata.finalizers = Some(vec!["other/keep".into(), "cairn.dev/bitmaps".into()]);
        cp.metadata.labels = Some(
            [
                (NODE_LABEL.to_string(), "node-1".to_string()),
                (VM_LABEL.to_string(), "vm1".to_string()),
            ]
            .into(),
        );
        assert!(routing_metadata(&cp, "node-1", "vm1", "cairn.dev/bitmaps").is_none());
        // The VM moved: only the label changes.
        let patch = routing_metadata(&cp, "node-2", "vm1", "cairn.dev/bitmaps").unwrap();
        assert_eq!(patch["metadata"]["labels"][NODE_LABEL], "node-2");
    }

    #[test]
    fn operator_conditions_keep_transition_time_and_drop_foreign_types() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-01-01T01:00:00Z".parse().unwrap();
        let (first, changed) = operator_conditions(&[], vec![accepted("n", "vm")], Some(1), t0);
        assert!(changed);
        let mut existing = first.clone();
        existing.push(Condition {
            type_: "Ready".into(),
            status: "True".into(),
            reason: "Created".into(),
            message: String::new(),
            observed_generation: Some(1),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t0),
        });
        let (again, changed) =
            operator_conditions(&existing, vec![accepted("n", "vm")], Some(1), t1);
        assert!(!changed);
        assert_eq!(again, first);
        let r = Rejection::vm_not_found("vm", "ns");
        let (failed, changed) = operator_conditions(&existing, rejected(&r), Some(1), t1);
        assert!(changed);
        assert_eq!(failed.len(), 2);
        assert!(failed.iter().all(|c| c.last_transition_time.0 == t1));
        assert!(rejected_by_operator(&failed));
    }

    #[test]
    fn placement_needs_a_node_name() {
        assert_eq!(placement(None), Placement::Missing);
        let mut q = QemuInstance::new("vm", Default::default());
        assert_eq!(placement(Some(&q)), Placement::Unplaced);
        q.status = Some(cairn_api::QemuInstanceStatus {
            node_name: Some("node-1".into()),
            ..Default::default()
        });
        assert_eq!(placement(Some(&q)), Placement::Node("node-1".into()));
    }
}
