//! End-to-end rigs for Cairn: real components (etcd, kube-apiserver,
//! kube-controller-manager, kubectl, helm, QEMU) found or built by [`tools`],
//! a control plane on loopback from [`control_plane`], an S3 server from
//! [`local_s3`] (and [`slow_link`] to slow the way to it), and the per-test
//! [`harness`]; a tiny real Linux guest in [`guest`]. `cargo xtask cluster`, `demo` and `test` use the same pieces.

#![forbid(unsafe_code)]

pub mod control_plane;
pub mod fake_guest_agent;
pub mod guest;
pub mod harness;
pub mod local_cluster;
pub mod local_s3;
pub mod repository_access;
pub mod scenario;
pub mod slow_link;
pub mod tools;
pub mod vm;
pub mod wait;
