//! `cairn-nbd`: the NBD protocol for Cairn, with no Kubernetes in sight.
//!
//! Three parts:
//! - [`proto`]: wire constants and small pure codecs shared by both sides.
//! - [`client`]: an async client (fixed newstyle, `NBD_OPT_GO`, structured
//!   replies, `NBD_OPT_SET_META_CONTEXT`, pipelined `NBD_CMD_READ` and
//!   `NBD_CMD_BLOCK_STATUS`). The agent reads point-in-time exports with it,
//!   asking `qemu:dirty-bitmap:<name>` which extents an incremental must read.
//! - [`server`]: a read-only server whose bytes come from a [`BlockSource`]
//!   the caller implements; QEMU can use its exports as backing files, which
//!   is how instant recovery serves a backup snapshot.
//!
//! The protocol is NetworkBlockDevice/nbd `doc/proto.md`; the experimental
//! extended headers are not implemented (servers fall back, clients are told no).
#![forbid(unsafe_code)]

pub mod client;
pub mod proto;
pub mod server;

pub use client::{
    BlockStatus, Client, ClientError, ConnectOptions, ExportInfo, ListedExport, MetaContext,
};
pub use proto::{BASE_ALLOCATION, Extent, qemu_dirty_bitmap_context};
pub use server::{BlockSource, FileSource, Server, ServerError};
