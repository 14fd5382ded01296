//! The checked-in CRD YAML must be exactly what the Rust types generate.

use std::path::Path;

#[test]
fn checked_in_crds_match_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests");
    let crds = cairn_api::crds();
    let kinds: std::collections::BTreeSet<_> =
        crds.iter().map(|c| c.spec.names.kind.clone()).collect();
    assert_eq!(kinds.len(), crds.len(), "a kind is listed twice");
    assert!(kinds.contains("VirtualMachineRestore"), "{kinds:?}");
    assert!(kinds.contains("VirtualMachineBackupSchedule"), "{kinds:?}");
    for crd in crds {
        let path = dir.join(cairn_api::crd_file_name(&crd));
        let on_disk = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!("{} missing ({e}); run `cargo xtask crdgen`", path.display())
        });
        assert!(
            on_disk == cairn_api::crd_yaml(&crd),
            "{} drifted from the Rust types; run `cargo xtask crdgen`",
            path.display()
        );
    }
    let files = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(
        files,
        cairn_api::crds().len(),
        "stray files in crds/manifests"
    );
}

#[test]
fn api_reference_matches_the_types() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/api-reference.md");
    let on_disk =
        std::fs::read_to_string(&path).expect("docs/api-reference.md; run `cargo xtask crdgen`");
    assert!(
        on_disk == cairn_api::reference::api_reference(&cairn_api::crds()),
        "docs/api-reference.md drifted; run `cargo xtask crdgen`"
    );
    assert!(on_disk.contains("`spec.virtualMachine`"));
}
