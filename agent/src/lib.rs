//! Cairn's node agent as a library: the data path between Kubernetes
//! resources and QEMU.
#![forbid(unsafe_code)]

pub mod qmp;
