//! QEMU-side names derived from a caller-provided identity.
//!
//! Every job id, block node, export and temporary bitmap an operation
//! creates is named `cairn-<tag>-...`, where `<tag>` is a short hash of the
//! caller's identity (a Kubernetes UID, say). A restarted agent given the
//! same identity therefore finds its jobs again, and anything carrying the
//! prefix that is not wanted any more is a leftover it may remove. Node
//! names are kept under QEMU's 31-byte limit.

use sha2::{Digest, Sha256};

/// The identity of one operation (a backup or export), e.g. a resource UID.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OperationId {
    identity: String,
    tag: String,
}

/// What a derived node plays in an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeRole {
    /// A push backup's target image.
    Target,
    /// A pull export's fleecing scratch image.
    Scratch,
    /// A pull export's copy-before-write filter above the disk.
    CopyBeforeWrite,
    /// A pull export's snapshot-access node (what the NBD export reads).
    SnapshotAccess,
}

impl OperationId {
    /// Derives the names of an operation from `identity` (any non-empty string).
    pub fn new(identity: impl Into<String>) -> Self {
        let identity = identity.into();
        let digest = Sha256::digest(identity.as_bytes());
        let tag = hex::encode(&digest[..5]);
        Self { identity, tag }
    }

    /// The identity this was derived from.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Prefix shared by every QEMU-side name of this operation.
    pub fn prefix(&self) -> String {
        format!("cairn-{}-", self.tag)
    }

    fn disk_tag(disk: &str) -> String {
        hex::encode(&Sha256::digest(disk.as_bytes())[..3])
    }

    /// Job id for `disk`.
    pub fn job_id(&self, disk: &str) -> String {
        format!("{}job-{}", self.prefix(), Self::disk_tag(disk))
    }

    /// Block node name for `disk` in `role` (at most 31 bytes).
    pub fn node_name(&self, disk: &str, role: NodeRole) -> String {
        let r = match role {
            NodeRole::Target => "tgt",
            NodeRole::Scratch => "fls",
            NodeRole::CopyBeforeWrite => "cbw",
            NodeRole::SnapshotAccess => "acc",
        };
        format!("{}{r}-{}", self.prefix(), Self::disk_tag(disk))
    }

    /// Temporary (non-persistent, disabled) bitmap for `disk`.
    pub fn temp_bitmap(&self, disk: &str) -> String {
        format!("{}bm-{}", self.prefix(), Self::disk_tag(disk))
    }

    /// NBD export id for `disk`.
    pub fn export_id(&self, disk: &str) -> String {
        format!("{}exp-{}", self.prefix(), Self::disk_tag(disk))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable_distinct_and_short() {
        let a = OperationId::new("5f0c8a1e-3b7d-4c2e-9a51-7d2f0e6b4c11");
        let b = OperationId::new("5f0c8a1e-3b7d-4c2e-9a51-7d2f0e6b4c12");
        assert_eq!(a, OperationId::new(a.identity()));
        assert_ne!(a.prefix(), b.prefix());
        for disk in ["disk0", "a-very-long-disk-name-that-users-might-pick"] {
            for role in [
                NodeRole::Target,
                NodeRole::Scratch,
                NodeRole::CopyBeforeWrite,
                NodeRole::SnapshotAccess,
            ] {
                let n = a.node_name(disk, role);
                assert!(n.len() <= 31, "{n} too long");
                assert!(n.starts_with(&a.prefix()));
                assert!(n.chars().next().unwrap().is_ascii_alphabetic());
            }
            assert!(a.job_id(disk).starts_with(&a.prefix()));
            assert!(a.temp_bitmap(disk).starts_with(&a.prefix()));
        }
        assert_ne!(a.job_id("disk0"), a.job_id("disk1"));
    }
}
