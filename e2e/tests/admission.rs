//! Admission on a real kube-apiserver: the examples apply, bad manifests are
//! rejected with the message the schema or a CEL rule gives, and `kubectl
//! explain` is informative.

use cairn_e2e::harness::TestEnv;

/// Applies `yaml` and expects rejection with `expect` in the error.
fn expect_rejected(env: &TestEnv, case: &str, yaml: &str, expect: &str) -> Result<(), String> {
    let (ok, _out, err) = env
        .kubectl_stdin(&["apply", "--server-side", "-f", "-"], yaml)
        .map_err(|e| e.to_string())?;
    if ok {
        return Err(format!("{case}: accepted but should be rejected"));
    }
    if !err.contains(expect) {
        return Err(format!("{case}: rejected, but without {expect:?}: {err}"));
    }
    Ok(())
}

fn checkpoint(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: cairn.dev/v1alpha1\nkind: VirtualMachineCheckpoint\nmetadata:\n  name: {name}\nspec:\n{spec}"
    )
}

fn backup(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: cairn.dev/v1alpha1\nkind: VirtualMachineBackup\nmetadata:\n  name: {name}\nspec:\n{spec}"
    )
}

fn repository(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: cairn.dev/v1alpha1\nkind: BackupRepository\nmetadata:\n  name: {name}\nspec:\n{spec}"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn examples_apply_cleanly_and_twice_is_a_no_op() -> anyhow::Result<()> {
    let env = TestEnv::new("examples").await?;
    let dir = TestEnv::example("");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let out = env
                .kubectl(&["apply", "-f", path.to_str().unwrap()])
                .output()?;
            assert!(
                out.status.success(),
                "{} rejected: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            let again = env
                .kubectl(&["apply", "-f", path.to_str().unwrap()])
                .output()?;
            let text = String::from_utf8_lossy(&again.stdout);
            assert!(
                text.contains("unchanged"),
                "{}: second apply changed something: {text}",
                path.display()
            );
            count += 1;
        }
    }
    assert!(count >= 6, "expected the examples, found {count}");
    let out = env.kubectl(&["get", "cairn", "-o", "name"]).output()?;
    let names = String::from_utf8_lossy(&out.stdout);
    // The category also lists cluster-scoped BackupRepositories (other tests
    // create some); the examples are all namespaced.
    let namespaced = names
        .lines()
        .filter(|l| !l.starts_with("backuprepository."))
        .count();
    assert_eq!(namespaced, count, "kubectl get cairn: {names}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_manifests_are_rejected_with_clear_messages() -> anyhow::Result<()> {
    let env = TestEnv::new("admission").await?;
    let push = "  target:\n    directory:\n      path: /backups/x\n";
    let cases: Vec<(&str, String, &str)> = vec![
        ("checkpoint without virtualMachine", checkpoint("c1", "  description: x\n"), "spec.virtualMachine: Required value"),
        ("checkpoint with empty virtualMachine", checkpoint("c2", "  virtualMachine: \"\"\n"), "spec.virtualMachine: Invalid value: \"\": spec.virtualMachine in body should be at least 1 chars long"),
        ("checkpoint with uppercase VM name", checkpoint("c3", "  virtualMachine: VM1\n"), "spec.virtualMachine in body should match"),
        ("checkpoint with over-long VM name", checkpoint("c4", &format!("  virtualMachine: {}\n", "a".repeat(254))), "may not be more than 253"),
        ("checkpoint with unknown field", checkpoint("c5", "  virtualMachine: vm1\n  bogus: 1\n"), ".spec.bogus: field not declared in schema"),
        ("checkpoint disk with bad mode", checkpoint("c6", "  virtualMachine: vm1\n  disks:\n  - name: vda\n    checkpoint: Maybe\n"), "supported values: \"Bitmap\", \"None\""),
        ("checkpoint disk bitmap with mode None", checkpoint("c7", "  virtualMachine: vm1\n  disks:\n  - name: vda\n    checkpoint: None\n    bitmap: b\n"), "bitmap can only be set when checkpoint is Bitmap"),
        ("checkpoint with duplicate disks", checkpoint("c8", "  virtualMachine: vm1\n  disks:\n  - name: vda\n  - name: vda\n"), "duplicate entries for key [name=\"vda\"]"),
        ("checkpoint with empty disk list", checkpoint("c9", "  virtualMachine: vm1\n  disks: []\n"), "should have at least 1 items"),
        ("checkpoint with empty disk name", checkpoint("c10", "  virtualMachine: vm1\n  disks:\n  - name: \"\"\n"), "should be at least 1 chars long"),
        ("checkpoint with bad bitmap name", checkpoint("c11", "  virtualMachine: vm1\n  disks:\n  - name: vda\n    bitmap: \"has space\"\n"), "bitmap in body should match"),
        ("checkpoint domain without redefine", checkpoint("c12", "  virtualMachine: vm1\n  domain:\n    disks:\n    - name: vda\n      file: /x.qcow2\n      format: qcow2\n"), "domain can only be given with redefine: true"),
        ("checkpoint redefine non-boolean", checkpoint("c13", "  virtualMachine: vm1\n  redefine: sometimes\n"), ".spec.redefine: expected boolean"),
        ("backup without virtualMachine", backup("b1", push), "spec.virtualMachine: Required value"),
        ("backup with bad mode", backup("b2", "  virtualMachine: vm1\n  mode: Teleport\n"), "supported values: \"Push\", \"Pull\""),
        ("push backup without target", backup("b3", "  virtualMachine: vm1\n  mode: Push\n"), "mode Push needs target.directory"),
        ("push is the default and needs a target", backup("b4", "  virtualMachine: vm1\n"), "mode Push needs target.directory"),
        ("pull backup with a directory", backup("b5", &format!("  virtualMachine: vm1\n  mode: Pull\n{push}")), "mode Pull serves an NBD export"),
        ("push backup with an nbd target", backup("b6", "  virtualMachine: vm1\n  target:\n    directory:\n      path: /b\n    nbd: {}\n"), "target takes one of directory, nbd or repository"),
        ("negative TTL", backup("b7", &format!("  virtualMachine: vm1\n  ttlSecondsAfterFinished: -1\n{push}")), "should be greater than or equal to 0"),
        ("relative target path", backup("b8", "  virtualMachine: vm1\n  target:\n    directory:\n      path: backups/x\n"), "target.directory.path must be absolute"),
        ("target path escaping with ..", backup("b9", "  virtualMachine: vm1\n  target:\n    directory:\n      path: /backups/../etc\n"), "must not contain '..'"),
        ("export timeout on a push backup", backup("b10", &format!("  virtualMachine: vm1\n  exportTimeoutSeconds: 60\n{push}")), "exportTimeoutSeconds is only for mode Pull"),
        ("checkpoint equal to its own base", backup("b11", &format!("  virtualMachine: vm1\n  incremental: cp1\n  checkpoint:\n    name: cp1\n{push}")), "checkpoint.name must differ from incremental"),
        ("fallbackToFull on a full backup", backup("b12", &format!("  virtualMachine: vm1\n  fallbackToFull: true\n{push}")), "fallbackToFull only applies to incremental backups"),
        ("nbd with both unix and tcp", backup("b13", "  virtualMachine: vm1\n  mode: Pull\n  target:\n    nbd:\n      unixSocket: {}\n      tcp:\n        port: 10809\n"), "nbd takes either unixSocket or tcp"),
        ("tcp port out of range", backup("b14", "  virtualMachine: vm1\n  mode: Pull\n  target:\n    nbd:\n      tcp:\n        port: 70000\n"), "should be less than or equal to 65535"),
        ("tcp with an address of the user's (the node's is used)", backup("b15", "  virtualMachine: vm1\n  mode: Pull\n  target:\n    nbd:\n      tcp:\n        address: 0.0.0.0\n"), ".spec.target.nbd.tcp.address: field not declared in schema"),
        ("empty incremental base", backup("b16", &format!("  virtualMachine: vm1\n  incremental: \"\"\n{push}")), "spec.incremental in body should be at least 1 chars long"),
        ("bad checkpoint name", backup("b17", &format!("  virtualMachine: vm1\n  checkpoint:\n    name: Not_Valid\n{push}")), "spec.checkpoint.name in body should match"),
        ("pull backup into a repository", backup("b18", "  virtualMachine: vm1\n  mode: Pull\n  target:\n    repository:\n      name: r\n"), "use mode Push"),
        ("directory and repository targets", backup("b19", "  virtualMachine: vm1\n  target:\n    directory:\n      path: /b\n    repository:\n      name: r\n"), "target takes one of directory, nbd or repository"),
        ("bad deletion policy", backup("b20", &format!("  virtualMachine: vm1\n  deletionPolicy: Shred\n{push}")), "supported values: \"Retain\", \"Delete\""),
        ("repository with two storages", repository("r1", "  storage:\n    directory:\n      path: /r\n    s3:\n      endpoint: http://127.0.0.1:1\n      bucket: bkt\n      credentialsSecret: s\n"), "storage takes exactly one of s3 or directory"),
        ("repository without storage", repository("r2", "  storage: {}\n"), "storage takes exactly one of s3 or directory"),
        ("repository chunk size not a power of two", repository("r3", "  storage:\n    directory:\n      path: /r\n  chunkSize: 100000\n"), "chunkSize must be a power of two"),
        ("repository chunk size too large", repository("r4", "  storage:\n    directory:\n      path: /r\n  chunkSize: 33554432\n"), "chunkSize must be a power of two"),
        ("repository with a relative directory", repository("r5", "  storage:\n    directory:\n      path: r\n"), "storage.directory.path must be absolute"),
        ("repository with a bad endpoint", repository("r6", "  storage:\n    s3:\n      endpoint: 127.0.0.1:1\n      bucket: bkt\n      credentialsSecret: s\n"), "endpoint must be an http:// or https:// URL"),
        ("repository with a bad compression", repository("r7", "  storage:\n    directory:\n      path: /r\n  compression: lz4\n"), "supported values: \"zstd\", \"none\""),
        ("qemu instance with unknown field", "apiVersion: cairn.dev/v1alpha1\nkind: QemuInstance\nmetadata:\n  name: q1\nspec:\n  x: 1\n".to_string(), ".spec: field not declared in schema"),
    ];
    assert!(cases.len() >= 20);
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|(case, yaml, expect)| expect_rejected(&env, case, yaml, expect).err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases wrong:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn specs_are_immutable() -> anyhow::Result<()> {
    let env = TestEnv::new("immutable").await?;
    let cp = checkpoint("cp", "  virtualMachine: vm1\n");
    let (ok, _, err) = env.kubectl_stdin(&["apply", "--server-side", "-f", "-"], &cp)?;
    assert!(ok, "{err}");
    expect_rejected(
        &env,
        "change a checkpoint's VM",
        &checkpoint("cp", "  virtualMachine: vm2\n"),
        "spec is immutable",
    )
    .map_err(anyhow::Error::msg)?;

    let b = backup(
        "b",
        "  virtualMachine: vm1\n  target:\n    directory:\n      path: /b/one\n",
    );
    let (ok, _, err) = env.kubectl_stdin(&["apply", "--server-side", "-f", "-"], &b)?;
    assert!(ok, "{err}");
    let moved = backup(
        "b",
        "  virtualMachine: vm1\n  target:\n    directory:\n      path: /b/two\n",
    );
    expect_rejected(
        &env,
        "change a backup's target",
        &moved,
        "spec is immutable",
    )
    .map_err(anyhow::Error::msg)?;
    // A repository's storage, chunk size and encryption are fixed once made.
    let name = env.namespace.clone();
    let repo = |spec: &str| repository(&name, spec);
    let dir = "  storage:\n    directory:\n      path: /r\n";
    let (ok, _, err) = env.kubectl_stdin(
        &["apply", "--server-side", "-f", "-"],
        &repo(&format!("{dir}  chunkSize: 1048576\n")),
    )?;
    assert!(ok, "{err}");
    for (case, spec, expect) in [
        (
            "change a repository's chunk size",
            format!("{dir}  chunkSize: 2097152\n"),
            "chunkSize is immutable",
        ),
        (
            "move a repository",
            "  storage:\n    directory:\n      path: /elsewhere\n  chunkSize: 1048576\n"
                .to_string(),
            "storage is immutable",
        ),
        (
            "encrypt an unencrypted repository",
            format!("{dir}  chunkSize: 1048576\n  encryption:\n    keySecret: k\n"),
            "encryption cannot be switched",
        ),
    ] {
        expect_rejected(&env, case, &repo(&spec), expect).map_err(anyhow::Error::msg)?;
    }
    env.kubectl(&["delete", "backuprepository", &name])
        .output()?;

    // Labels and annotations stay mutable (the operator routes by label).
    let out = env
        .kubectl(&["label", "vmb", "b", "cairn.dev/node=node-1"])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_explain_is_informative() -> anyhow::Result<()> {
    let env = TestEnv::new("explain").await?;
    let explain = |what: &str| -> anyhow::Result<String> {
        let out = env.kubectl(&["explain", what]).output()?;
        anyhow::ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let spec = explain("virtualmachinebackup.spec")?;
    for needle in [
        "virtualMachine",
        "incremental",
        "fallbackToFull",
        "ttlSecondsAfterFinished",
        "Name of a checkpoint of the same VM",
        "Push",
        "Pull",
        "-required-",
    ] {
        assert!(
            spec.contains(needle),
            "explain virtualmachinebackup.spec lacks {needle:?}:\n{spec}"
        );
    }
    let cp = explain("vmcp.spec.redefine")?;
    assert!(cp.contains("qemu-img bitmap --add"), "{cp}");
    let status = explain("virtualmachinecheckpoint.status")?;
    for needle in ["parent", "conditions", "observedGeneration", "domain"] {
        assert!(
            status.contains(needle),
            "explain checkpoint status lacks {needle}:\n{status}"
        );
    }
    let qi = explain("qemuinstance.status.disks.bitmaps")?;
    assert!(qi.contains("inconsistent"), "{qi}");
    // Short names and the category resolve.
    for kind in ["vmcp", "vmcheckpoint", "vmb", "vmbackup", "qemu", "cairn"] {
        let out = env.kubectl(&["get", kind]).output()?;
        assert!(
            out.status.success(),
            "kubectl get {kind}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
