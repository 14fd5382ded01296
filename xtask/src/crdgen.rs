//! `cargo xtask crdgen`: writes the CRD YAML generated from the Rust types.

use anyhow::{Result, bail};

pub fn run(check: bool) -> Result<()> {
    let dir = cairn_e2e::tools::repo_root().join("crds/manifests");
    std::fs::create_dir_all(&dir)?;
    let mut stale = Vec::new();
    for crd in cairn_api::crds() {
        let path = dir.join(cairn_api::crd_file_name(&crd));
        let yaml = cairn_api::crd_yaml(&crd);
        if std::fs::read_to_string(&path).ok().as_deref() != Some(yaml.as_str()) {
            if check {
                stale.push(path.display().to_string());
            } else {
                std::fs::write(&path, yaml)?;
                println!("wrote {}", path.display());
            }
        }
    }
    let reference = cairn_e2e::tools::repo_root().join("docs/api-reference.md");
    let text = cairn_api::reference::api_reference(&cairn_api::crds());
    if std::fs::read_to_string(&reference).ok().as_deref() != Some(text.as_str()) {
        if check {
            stale.push(reference.display().to_string());
        } else {
            std::fs::write(&reference, text)?;
            println!("wrote {}", reference.display());
        }
    }
    if !stale.is_empty() {
        bail!(
            "generated CRDs differ from the checked-in files: {stale:?}; run `cargo xtask crdgen`"
        );
    }
    Ok(())
}
