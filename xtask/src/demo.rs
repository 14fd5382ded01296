//! `cargo xtask demo`: Cairn's main job on a local control plane.

use anyhow::Result;

pub fn run() -> Result<()> {
    crate::cluster::demo()
}
