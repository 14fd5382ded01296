//! The Helm chart and the container images, checked with the real tools: `helm
//! lint`, `helm template` piped into a server-side dry run on a real
//! kube-apiserver, `helm install / upgrade / uninstall`, RBAC seen through
//! `kubectl auth can-i` and through a tenant's own bearer token, and the
//! Dockerfiles against what `cargo build --release` produces.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use cairn_e2e::harness::TestEnv;
use cairn_e2e::tools::{Tools, repo_root};
use serde_json::Value;

fn chart_dir() -> PathBuf {
    repo_root().join("charts/cairn")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// helm with its cache/config/data homes in a private directory, so tests never
/// touch (or depend on) the invoking user's helm setup.
struct Helm {
    bin: PathBuf,
    home: tempfile::TempDir,
}

impl Helm {
    fn new(tools: &Tools) -> Result<Self> {
        Ok(Self {
            bin: tools.helm.clone(),
            home: tempfile::tempdir()?,
        })
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        let h = self.home.path();
        c.env("HELM_CACHE_HOME", h.join("cache"))
            .env("HELM_CONFIG_HOME", h.join("config"))
            .env("HELM_DATA_HOME", h.join("data"))
            .env_remove("KUBECONFIG")
            .args(args);
        c
    }

    fn run(&self, args: &[&str]) -> Result<Output> {
        self.cmd(args)
            .output()
            .with_context(|| format!("running helm {args:?}"))
    }

    /// `helm template` of the chart with `extra` arguments; fails on a helm error.
    fn template(&self, namespace: &str, extra: &[&str]) -> Result<String> {
        let chart = chart_dir();
        let mut args = vec![
            "template",
            "cairn",
            chart.to_str().unwrap(),
            "--namespace",
            namespace,
        ];
        args.extend_from_slice(extra);
        let out = self.run(&args)?;
        ensure!(out.status.success(), "helm {args:?} failed: {}", text(&out));
        Ok(String::from_utf8(out.stdout)?)
    }
}

fn tools() -> Result<Tools> {
    Tools::ensure()
}

/// Every object of a multi-document YAML stream.
fn objects(yaml: &str) -> Result<Vec<Value>> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(yaml).context("parsing rendered YAML")?;
    Ok(docs.into_iter().filter(|d| d.is_object()).collect())
}

fn find<'a>(objs: &'a [Value], kind: &str, name_suffix: &str) -> Result<&'a Value> {
    objs.iter()
        .find(|o| {
            o["kind"] == kind
                && o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with(name_suffix))
        })
        .with_context(|| format!("no {kind} named *{name_suffix} in the rendered chart"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The (apiGroup, resource, verb) triples a role grants.
fn grants(role: &Value) -> BTreeSet<(String, String, String)> {
    let mut set = BTreeSet::new();
    for rule in role["rules"].as_array().into_iter().flatten() {
        for g in strings(&rule["apiGroups"]) {
            for r in strings(&rule["resources"]) {
                for v in strings(&rule["verbs"]) {
                    set.insert((g.clone(), r.clone(), v.clone()));
                }
            }
        }
    }
    set
}

fn triples(spec: &[(&str, &[&str], &[&str])]) -> BTreeSet<(String, String, String)> {
    let mut set = BTreeSet::new();
    for (g, rs, vs) in spec {
        for r in *rs {
            for v in *vs {
                set.insert((g.to_string(), r.to_string(), v.to_string()));
            }
        }
    }
    set
}

const READ: &[&str] = &["get", "list", "watch"];
const CP_BK: &[&str] = &[
    "virtualmachinecheckpoints",
    "virtualmachinebackups",
    "virtualmachinerestores",
];
const CP_BK_STATUS: &[&str] = &[
    "virtualmachinecheckpoints/status",
    "virtualmachinebackups/status",
    "virtualmachinerestores/status",
];

// ---------------------------------------------------------------- no cluster

#[test]
fn chart_crds_are_byte_identical_to_the_generated_crds() -> Result<()> {
    let generated = repo_root().join("crds/manifests");
    let in_chart = chart_dir().join("crds");
    let names = |dir: &Path| -> Result<BTreeSet<String>> {
        Ok(std::fs::read_dir(dir)?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()?)
    };
    let (want, have) = (names(&generated)?, names(&in_chart)?);
    assert_eq!(
        have, want,
        "charts/cairn/crds/ must hold exactly crds/manifests/ (copy them after `cargo xtask crdgen`)"
    );
    assert_eq!(
        want.len(),
        cairn_api::crds().len(),
        "expected one manifest per kind, found {want:?}"
    );
    for name in &want {
        let a = std::fs::read(generated.join(name))?;
        let b = std::fs::read(in_chart.join(name))?;
        assert!(
            a == b,
            "charts/cairn/crds/{name} differs from crds/manifests/{name}; run \
             `cp crds/manifests/*.yaml charts/cairn/crds/`"
        );
    }
    Ok(())
}

/// One stage of a Dockerfile: base image, alias and its instructions (with
/// line continuations joined).
#[derive(Debug)]
struct Stage {
    from: String,
    alias: Option<String>,
    instructions: Vec<(String, String)>,
}

fn parse_dockerfile(path: &Path) -> Result<Vec<Stage>> {
    let raw = std::fs::read_to_string(path)?;
    let mut logical = Vec::new();
    let mut cur = String::new();
    for line in raw.lines() {
        let t = line.trim();
        if cur.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if let Some(stripped) = t.strip_suffix('\\') {
            cur.push_str(stripped);
            cur.push(' ');
        } else {
            cur.push_str(t);
            logical.push(std::mem::take(&mut cur));
        }
    }
    let mut stages: Vec<Stage> = Vec::new();
    for l in logical {
        let (instr, rest) = l.split_once(' ').unwrap_or((&l, ""));
        let instr = instr.to_ascii_uppercase();
        if instr == "FROM" {
            let words: Vec<&str> = rest.split_whitespace().collect();
            let alias = match words.as_slice() {
                [_, as_, alias] if as_.eq_ignore_ascii_case("as") => Some(alias.to_string()),
                _ => None,
            };
            stages.push(Stage {
                from: words.first().context("FROM without image")?.to_string(),
                alias,
                instructions: vec![],
            });
        } else {
            stages
                .last_mut()
                .context("instruction before FROM")?
                .instructions
                .push((instr, rest.trim().to_string()));
        }
    }
    Ok(stages)
}

/// What `cargo metadata` says about the workspace: target directory (relative
/// to the workspace root), member directories and each package's binaries.
struct Workspace {
    target_dir: PathBuf,
    member_dirs: BTreeSet<String>,
    bins: BTreeMap<String, Vec<String>>,
}

fn workspace() -> Result<Workspace> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["metadata", "--format-version=1", "--no-deps", "--offline"])
        .current_dir(repo_root())
        .output()?;
    ensure!(out.status.success(), "cargo metadata: {}", text(&out));
    let meta: Value = serde_json::from_slice(&out.stdout)?;
    let root = PathBuf::from(meta["workspace_root"].as_str().context("workspace_root")?);
    let target = PathBuf::from(
        meta["target_directory"]
            .as_str()
            .context("target_directory")?,
    );
    let mut member_dirs = BTreeSet::new();
    let mut bins = BTreeMap::new();
    for p in meta["packages"].as_array().context("packages")? {
        let manifest = PathBuf::from(p["manifest_path"].as_str().unwrap_or_default());
        let dir = manifest.parent().unwrap().strip_prefix(&root)?;
        member_dirs.insert(dir.display().to_string());
        let b: Vec<String> = p["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| strings(&t["kind"]).iter().any(|k| k == "bin"))
            .filter_map(|t| t["name"].as_str().map(str::to_string))
            .collect();
        bins.insert(p["name"].as_str().unwrap_or_default().to_string(), b);
    }
    Ok(Workspace {
        target_dir: target.strip_prefix(&root)?.to_path_buf(),
        member_dirs,
        bins,
    })
}

/// The Dockerfiles build with `cargo build --release --locked -p <crate>` and
/// copy the binary from where that build leaves it: the command and the paths are
/// checked against `cargo metadata` here (`--release` without `--target` or
/// `--profile` puts binaries in `<target-dir>/release/<bin>`), and
/// `release_binaries_the_dockerfiles_copy_build_and_start` runs the build itself.
#[test]
fn dockerfiles_build_and_copy_the_binaries_cargo_produces() -> Result<()> {
    let ws = workspace()?;
    let config =
        std::fs::read_to_string(repo_root().join(".cargo/config.toml")).unwrap_or_default();
    assert!(
        !config.contains("target-dir") && !config.contains("[build]"),
        ".cargo/config.toml changes where cargo puts binaries; update the Dockerfiles and this test"
    );
    for (file, krate, final_image) in [
        (
            "operator.Dockerfile",
            "cairn-operator",
            "gcr.io/distroless/cc-debian12:nonroot",
        ),
        ("agent.Dockerfile", "cairn-agent", "debian:bookworm-slim"),
    ] {
        let path = repo_root().join("docker").join(file);
        let stages = parse_dockerfile(&path)?;
        assert_eq!(stages.len(), 2, "{file}: expected builder + final stage");
        let (builder, runtime) = (&stages[0], &stages[1]);
        assert_eq!(builder.from, "rust:1.95-bookworm", "{file}: builder image");
        let alias = builder
            .alias
            .clone()
            .context("builder stage has no alias")?;
        assert_eq!(runtime.from, final_image, "{file}: final image");

        let workdir = builder
            .instructions
            .iter()
            .rev()
            .find(|(i, _)| i == "WORKDIR")
            .map(|(_, w)| w.clone())
            .context("builder has no WORKDIR")?;
        // Every COPY source of the builder exists, and every workspace member is copied.
        let mut copied = BTreeSet::new();
        for (_, args) in builder.instructions.iter().filter(|(i, _)| i == "COPY") {
            let words: Vec<&str> = args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            for src in &words[..words.len() - 1] {
                assert!(
                    repo_root().join(src).exists(),
                    "{file}: COPY source {src} does not exist"
                );
                copied.insert(src.trim_end_matches('/').to_string());
            }
        }
        for member in &ws.member_dirs {
            assert!(
                copied.contains(member),
                "{file}: workspace member {member} is not copied (cargo needs every member)"
            );
        }
        assert!(
            copied.contains("Cargo.lock"),
            "{file}: --locked needs Cargo.lock"
        );

        // The build command.
        let build = builder
            .instructions
            .iter()
            .filter(|(i, _)| i == "RUN")
            .find_map(|(_, r)| r.find("cargo build").map(|at| r[at..].to_string()))
            .with_context(|| format!("{file}: no `cargo build` in the builder"))?;
        let words: Vec<&str> = build
            .split("&&")
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        for flag in ["--release", "--locked"] {
            assert!(words.contains(&flag), "{file}: `{build}` lacks {flag}");
        }
        for flag in ["--target", "--profile", "--target-dir", "--debug"] {
            assert!(
                !words.iter().any(|w| w.starts_with(flag)),
                "{file}: `{build}` uses {flag}: the copied path would be wrong"
            );
        }
        let pkgs: Vec<&str> = words
            .windows(2)
            .filter(|w| w[0] == "-p" || w[0] == "--package")
            .map(|w| w[1])
            .collect();
        assert_eq!(pkgs, vec![krate], "{file}: builds {pkgs:?}");
        let bins = ws
            .bins
            .get(krate)
            .with_context(|| format!("no package {krate}"))?;
        assert_eq!(bins, &vec![krate.to_string()], "{krate}'s binaries");

        // The final stage copies exactly that binary and runs it.
        let expected_src = Path::new(&workdir)
            .join(&ws.target_dir)
            .join("release")
            .join(krate);
        let copy = runtime
            .instructions
            .iter()
            .find(|(i, a)| i == "COPY" && a.contains(&format!("--from={alias}")))
            .map(|(_, a)| a.clone())
            .with_context(|| format!("{file}: final stage copies nothing from {alias}"))?;
        let words: Vec<&str> = copy
            .split_whitespace()
            .filter(|w| !w.starts_with("--"))
            .collect();
        assert_eq!(words.len(), 2, "{file}: COPY {copy}");
        assert_eq!(
            Path::new(words[0]),
            expected_src,
            "{file}: copies the wrong binary path"
        );
        let entry = runtime
            .instructions
            .iter()
            .find(|(i, _)| i == "ENTRYPOINT")
            .map(|(_, a)| a.clone())
            .with_context(|| format!("{file}: no ENTRYPOINT"))?;
        let entry: Vec<String> = serde_json::from_str(&entry)?;
        assert_eq!(entry[0], words[1], "{file}: ENTRYPOINT runs something else");

        let user = runtime
            .instructions
            .iter()
            .rev()
            .find(|(i, _)| i == "USER")
            .map(|(_, u)| u.as_str());
        if krate == "cairn-operator" {
            assert_eq!(
                user,
                Some("65532:65532"),
                "{file}: the operator runs as distroless nonroot"
            );
        } else {
            let run: String = runtime
                .instructions
                .iter()
                .filter(|(i, _)| i == "RUN")
                .map(|(_, r)| r.as_str())
                .collect();
            assert!(
                run.contains("-t bookworm-backports qemu-utils"),
                "{file}: qemu-utils must come from bookworm-backports"
            );
            assert!(run.contains("libnbd-bin"), "{file}: the agent runs nbdcopy");
        }
        let ignore = repo_root()
            .join("docker")
            .join(format!("{file}.dockerignore"));
        let ignore =
            std::fs::read_to_string(&ignore).with_context(|| format!("{}", ignore.display()))?;
        assert!(
            ignore.lines().any(|l| l.trim() == "target"),
            "{file}: target/ must stay out of the context"
        );
    }
    Ok(())
}

/// Leaf paths (`operator.image.tag`) of the values schema.
fn schema_leaves(schema: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    match schema.get("properties").and_then(Value::as_object) {
        Some(props) if !props.is_empty() => {
            for (k, v) in props {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                // Maps of free-form Kubernetes objects are documented as one entry.
                let is_leafy_object = v.get("properties").is_none();
                if is_leafy_object {
                    out.insert(path);
                } else {
                    schema_leaves(v, &path, out);
                }
            }
        }
        _ => {
            out.insert(prefix.to_string());
        }
    }
}

#[test]
fn operations_doc_documents_every_value_of_the_schema() -> Result<()> {
    let doc = std::fs::read_to_string(repo_root().join("docs/operations.md"))?;
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(
        chart_dir().join("values.schema.json"),
    )?)?;
    let values: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(chart_dir().join("values.yaml"))?)?;
    let table = doc
        .split("## Configuration reference")
        .nth(1)
        .context("docs/operations.md has no `## Configuration reference` section")?;
    let table = table.split("\n## ").next().unwrap();
    let documented: BTreeSet<String> = table
        .lines()
        .filter(|l| l.starts_with("| `"))
        .filter_map(|l| l.split('`').nth(1).map(str::to_string))
        .collect();
    ensure!(!documented.is_empty(), "the configuration table is empty");

    for key in values
        .as_object()
        .context("values.yaml is not a map")?
        .keys()
    {
        assert!(
            documented
                .iter()
                .any(|d| d == key || d.starts_with(&format!("{key}."))),
            "values.yaml key `{key}` is missing from docs/operations.md's configuration table"
        );
    }
    let mut leaves = BTreeSet::new();
    schema_leaves(&schema, "", &mut leaves);
    leaves.remove("global");
    let missing: Vec<_> = leaves.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "schema keys not in the configuration table: {missing:?}"
    );
    let stale: Vec<_> = documented.difference(&leaves).collect();
    assert!(
        stale.is_empty(),
        "the configuration table documents keys the schema does not have: {stale:?}"
    );
    Ok(())
}

#[test]
fn helm_lint_passes_with_default_and_ci_values() -> Result<()> {
    let helm = Helm::new(&tools()?)?;
    let chart = chart_dir();
    let mut files = vec![None];
    for e in std::fs::read_dir(chart.join("ci"))? {
        files.push(Some(e?.path()));
    }
    assert!(
        files.len() >= 3,
        "expected default and custom values files in charts/cairn/ci/"
    );
    for f in files {
        let mut args = vec!["lint", "--strict", chart.to_str().unwrap()];
        let f = f.map(|p| p.display().to_string());
        if let Some(f) = &f {
            args.extend(["-f", f.as_str()]);
        }
        let out = helm.run(&args)?;
        assert!(out.status.success(), "helm {args:?}: {}", text(&out));
        assert!(
            text(&out).contains("0 chart(s) failed"),
            "helm {args:?}: {}",
            text(&out)
        );
    }
    Ok(())
}

#[test]
fn values_schema_and_chart_reject_bad_values() -> Result<()> {
    let helm = Helm::new(&tools()?)?;
    let chart = chart_dir();
    let cases: &[(&str, &[&str], &str)] = &[
        (
            "replicas as a word",
            &["--set-string", "operator.replicas=two"],
            "/operator/replicas",
        ),
        (
            "zero replicas",
            &["--set", "operator.replicas=0"],
            "/operator/replicas",
        ),
        (
            "unknown top-level key",
            &["--set", "bogus=1"],
            "'bogus' not allowed",
        ),
        (
            "unknown nested key",
            &["--set", "agent.privileged=true"],
            "'privileged' not allowed",
        ),
        (
            "relative backup root",
            &["--set", "backupRoots={backups}"],
            "/backupRoots/0",
        ),
        (
            "root as backup root",
            &["--set", "backupRoots={/}"],
            "/backupRoots/0",
        ),
        (
            "colon in a backup root",
            &["--set", "backupRoots={/a:b}"],
            "/backupRoots/0",
        ),
        (
            "relative repository root",
            &["--set", "repositoryRoots={repository}"],
            "/repositoryRoots/0",
        ),
        (
            "backup root reused as repository root",
            &["--set", "repositoryRoots={/var/lib/cairn/backups}"],
            "listed twice",
        ),
        (
            "no backup root",
            &["--set", "backupRoots=null"],
            "backupRoots",
        ),
        (
            "capability beyond the allowed three",
            &["--set", "agent.capabilities={SYS_ADMIN}"],
            "/agent/capabilities/0",
        ),
        (
            "bad pull policy",
            &["--set", "operator.image.pullPolicy=Sometimes"],
            "/operator/image/pullPolicy",
        ),
        (
            "bad port",
            &["--set", "agent.metricsPort=70000"],
            "/agent/metricsPort",
        ),
        (
            "dot-dot in a root",
            &["--set", "imageRoots={/var/lib/../../etc}"],
            "no . or .. segments",
        ),
        (
            "socket dir reused as image root",
            &["--set", "imageRoots={/run/cairn/qmp/}"],
            "listed twice",
        ),
        (
            "ServiceMonitor without its API",
            &["--set", "metrics.serviceMonitor.enabled=true"],
            "no monitoring.coreos.com/v1 ServiceMonitor API",
        ),
        (
            "PrometheusRule without its API",
            &["--set", "metrics.prometheusRule.enabled=true"],
            "no monitoring.coreos.com/v1 PrometheusRule API",
        ),
    ];
    for (case, extra, expect) in cases {
        let mut args = vec!["template", "cairn", chart.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = helm.run(&args)?;
        assert!(
            !out.status.success(),
            "{case}: accepted, but must be rejected"
        );
        assert!(
            text(&out).contains(expect),
            "{case}: rejected without {expect:?}: {}",
            text(&out)
        );
    }
    // The control: the same command with valid values renders.
    helm.template(
        "default",
        &[
            "--set",
            "operator.replicas=1",
            "--set-json",
            "agent.capabilities=[]",
        ],
    )?;
    Ok(())
}

/// Checks what the brief of the chart promises, on the rendered objects.
fn check_rendered(objs: &[Value], values: &Value) -> Result<()> {
    // No wildcard anywhere in RBAC.
    for o in objs
        .iter()
        .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
    {
        for rule in o["rules"].as_array().into_iter().flatten() {
            for field in [
                "apiGroups",
                "resources",
                "verbs",
                "resourceNames",
                "nonResourceURLs",
            ] {
                assert!(
                    !strings(&rule[field]).iter().any(|s| s.contains('*')),
                    "{}: wildcard in {field}",
                    o["metadata"]["name"]
                );
            }
        }
    }
    let events = [
        ("", &["events"][..], &["create", "patch"][..]),
        ("events.k8s.io", &["events"], &["create", "patch"]),
    ];
    let agent_role = find(objs, "ClusterRole", "-agent")?;
    let mut want = triples(&[
        (
            "cairn.dev",
            &["qemuinstances"],
            &[
                "get", "list", "watch", "create", "update", "patch", "delete",
            ],
        ),
        ("cairn.dev", &["qemuinstances/status"], &["update", "patch"]),
        ("cairn.dev", CP_BK, READ),
        ("cairn.dev", CP_BK_STATUS, &["update", "patch"]),
        ("cairn.dev", &["backuprepositories"], READ),
    ]);
    want.extend(triples(&events));
    assert_eq!(grants(agent_role), want, "agent ClusterRole");

    let operator_role = find(objs, "ClusterRole", "-operator")?;
    let mut want = triples(&[
        (
            "cairn.dev",
            CP_BK,
            &[
                "get", "list", "watch", "create", "update", "patch", "delete",
            ],
        ),
        ("cairn.dev", CP_BK_STATUS, &["get", "update", "patch"]),
        ("cairn.dev", &["qemuinstances"], READ),
        ("cairn.dev", &["virtualmachinebackupschedules"], READ),
        (
            "cairn.dev",
            &["virtualmachinebackupschedules/status"],
            &["get", "update", "patch"],
        ),
        ("cairn.dev", &["backuprepositories"], READ),
        (
            "cairn.dev",
            &["backuprepositories/status"],
            &["get", "update", "patch"],
        ),
        ("", &["namespaces"], READ),
        // TLS-PSK Secrets of TCP pull exports in tenant namespaces: written
        // and removed, never read.
        ("", &["secrets"], &["create", "delete"]),
    ]);
    want.extend(triples(&events));
    assert_eq!(grants(operator_role), want, "operator ClusterRole");
    // The agent's copy of those credentials: the operator annotates it.
    assert_eq!(
        grants(find(objs, "Role", "-operator-export-credentials")?),
        triples(&[("", &["secrets"], &["patch"])]),
        "export-credentials Role"
    );
    // Repository credentials: `get` on Secrets of the release namespace, nothing more.
    for who in ["-operator-repository-secrets", "-agent-repository-secrets"] {
        let role = find(objs, "Role", who)?;
        assert_eq!(
            grants(role),
            triples(&[("", &["secrets"], &["get"])]),
            "{who} Role"
        );
    }

    let lease_role = find(objs, "Role", "-operator-leader-election")?;
    assert_eq!(
        grants(lease_role),
        triples(&[(
            "coordination.k8s.io",
            &["leases"],
            &["get", "create", "update"]
        )]),
        "leader-election Role"
    );
    for rule in lease_role["rules"].as_array().unwrap() {
        if strings(&rule["verbs"]) != ["create"] {
            assert_eq!(
                strings(&rule["resourceNames"]),
                ["cairn-operator"],
                "lease get/update limited to cairn-operator"
            );
        }
    }

    if values["rbac"]["aggregateToDefaultRoles"] != false {
        let view = find(objs, "ClusterRole", "-view")?;
        assert_eq!(
            view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"],
            "true"
        );
        assert!(
            grants(view)
                .iter()
                .all(|(_, _, v)| READ.contains(&v.as_str())),
            "view is read-only"
        );
        let all_kinds: BTreeSet<_> = grants(view).into_iter().map(|(_, r, _)| r).collect();
        for kind in [
            "qemuinstances",
            "virtualmachinecheckpoints",
            "virtualmachinebackups",
            "virtualmachinerestores",
            "virtualmachinebackupschedules",
        ] {
            assert!(all_kinds.contains(kind), "view cannot read {kind}");
        }
        let edit = find(objs, "ClusterRole", "-edit")?;
        for label in ["aggregate-to-edit", "aggregate-to-admin"] {
            assert_eq!(
                edit["metadata"]["labels"][format!("rbac.authorization.k8s.io/{label}")],
                "true"
            );
        }
        for (_, r, v) in grants(edit) {
            if r.starts_with("qemuinstances") || r.ends_with("/status") {
                assert!(
                    READ.contains(&v.as_str()),
                    "edit/admin may only read {r}, not {v}"
                );
            }
        }
        for kind in CP_BK.iter().chain(&["virtualmachinebackupschedules"]) {
            for verb in ["create", "update", "patch", "delete"] {
                assert!(
                    grants(edit).contains(&("cairn.dev".into(), kind.to_string(), verb.into())),
                    "edit cannot {verb} {kind}"
                );
            }
        }
    } else {
        assert!(
            find(objs, "ClusterRole", "-edit").is_err(),
            "aggregated roles rendered although disabled"
        );
    }

    // Operator Deployment.
    let dep = find(objs, "Deployment", "-operator")?;
    assert_eq!(dep["spec"]["replicas"], values["operator"]["replicas"]);
    let pod = &dep["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(
        c["ports"][0]["containerPort"],
        values["operator"]["metricsPort"]
    );
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert!(
        sc["capabilities"]["add"].is_null(),
        "the operator adds no capability"
    );
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert!(c["resources"]["requests"].is_object(), "operator resources");
    let env: BTreeMap<String, Value> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e.clone()))
        .collect();
    for name in [
        "POD_NAME",
        "POD_NAMESPACE",
        "CAIRN_METRICS_ADDR",
        "RUST_LOG",
    ] {
        assert!(env.contains_key(name), "operator env lacks {name}");
    }
    assert_eq!(
        env["CAIRN_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"], "metadata.namespace",
        "the operator reads repository Secrets in its own namespace"
    );

    // Agent DaemonSet.
    let ds = find(objs, "DaemonSet", "-agent")?;
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(
        pod["priorityClassName"],
        values["agent"]["priorityClassName"]
    );
    assert!(
        pod["tolerations"].as_array().is_some_and(|t| !t.is_empty()),
        "agent tolerations"
    );
    for host in ["hostNetwork", "hostPID", "hostIPC"] {
        assert_ne!(pod[host], true, "agent must not use {host}");
    }
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    let added = strings(&sc["capabilities"]["add"]);
    for cap in &added {
        assert!(
            ["DAC_OVERRIDE", "CHOWN", "FOWNER"].contains(&cap.as_str()),
            "agent adds {cap}"
        );
    }
    assert_eq!(added, strings(&values["agent"]["capabilities"]));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    let env: BTreeMap<String, Value> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e.clone()))
        .collect();
    assert_eq!(
        env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    assert_eq!(env["CAIRN_SOCKET_DIR"]["value"], values["socketDir"]);
    assert_eq!(env["CAIRN_RUNTIME_DIR"]["value"], values["runtimeDir"]);
    assert_eq!(env["CAIRN_EXPORT_DIR"]["value"], values["exportDir"]);
    assert_eq!(env["CAIRN_SCRATCH_DIR"]["value"], values["scratchDir"]);
    assert_eq!(
        env["CAIRN_SCRATCH_RESERVE"]["value"],
        values["scratchReserve"]
    );
    assert!(
        !env.contains_key("CAIRN_BACKUP_ROOTS"),
        "one variable names the roots"
    );
    assert_eq!(
        env["CAIRN_ALLOWED_ROOTS"]["value"],
        strings(&values["backupRoots"]).join(",")
    );
    assert_eq!(
        env["CAIRN_REPOSITORY_ROOTS"]["value"],
        strings(&values["repositoryRoots"]).join(",")
    );
    assert_eq!(
        env["CAIRN_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"], "metadata.namespace",
        "the agent reads repository Secrets in its own namespace"
    );

    // Exactly the host paths the values name, each mounted at the same path; /tmp an emptyDir.
    let mut want_paths: BTreeSet<String> = [
        &values["socketDir"],
        &values["runtimeDir"],
        &values["exportDir"],
        &values["scratchDir"],
    ]
    .iter()
    .map(|v| v.as_str().unwrap().to_string())
    .collect();
    want_paths.extend(strings(&values["backupRoots"]));
    want_paths.extend(strings(&values["repositoryRoots"]));
    want_paths.extend(strings(&values["imageRoots"]));
    let volumes = pod["volumes"].as_array().unwrap();
    let mut host_paths = BTreeSet::new();
    for v in volumes {
        if let Some(p) = v["hostPath"]["path"].as_str() {
            host_paths.insert(p.to_string());
            let mount = c["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["name"] == v["name"])
                .with_context(|| format!("volume {} is not mounted", v["name"]))?;
            assert_eq!(
                mount["mountPath"], p,
                "host path {p} must be mounted at the same path"
            );
            assert_ne!(
                mount["mountPropagation"], "Bidirectional",
                "Bidirectional needs privileged"
            );
        } else {
            assert!(v["emptyDir"].is_object(), "unexpected volume {v}");
        }
    }
    assert_eq!(host_paths, want_paths, "agent host paths");
    let tmp = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/tmp");
    assert!(tmp.is_some(), "agent has no writable /tmp");

    // Metrics Services for both.
    find(objs, "Service", "-operator-metrics")?;
    find(objs, "Service", "-agent-metrics")?;
    let monitors = objs
        .iter()
        .filter(|o| o["kind"] == "ServiceMonitor")
        .count();
    let want_monitors = if values["metrics"]["serviceMonitor"]["enabled"] == true {
        2
    } else {
        0
    };
    assert_eq!(monitors, want_monitors, "ServiceMonitors");
    let rules: Vec<&Value> = objs
        .iter()
        .filter(|o| o["kind"] == "PrometheusRule")
        .collect();
    if values["metrics"]["prometheusRule"]["enabled"] == true {
        let expr = rules
            .first()
            .and_then(|r| r["spec"]["groups"][0]["rules"][0]["expr"].as_str())
            .unwrap_or_default();
        let limit = &values["metrics"]["prometheusRule"]["noBackupForSeconds"];
        assert_eq!(
            expr,
            format!("time() - cairn_operator_schedule_last_success_timestamp_seconds > {limit}"),
            "the no-recent-backup alert"
        );
    } else {
        assert!(
            rules.is_empty(),
            "PrometheusRule rendered although disabled"
        );
    }
    Ok(())
}

#[test]
fn the_optional_prometheus_rule_alerts_on_schedules_without_a_recent_backup() -> Result<()> {
    let helm = Helm::new(&tools()?)?;
    let set = [
        "--set",
        "metrics.prometheusRule.enabled=true",
        "--set",
        "metrics.prometheusRule.noBackupForSeconds=3600",
        "--api-versions",
        "monitoring.coreos.com/v1/PrometheusRule",
    ];
    let objs = objects(&helm.template("cairn-system", &set)?)?;
    let mut values = merged_values(None)?;
    values["metrics"]["prometheusRule"]["enabled"] = Value::Bool(true);
    values["metrics"]["prometheusRule"]["noBackupForSeconds"] = 3600.into();
    check_rendered(&objs, &values)?;
    Ok(())
}

fn merged_values(file: Option<&str>) -> Result<Value> {
    let mut base: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(chart_dir().join("values.yaml"))?)?;
    if let Some(f) = file {
        let over: Value = serde_saphyr::from_str(&std::fs::read_to_string(chart_dir().join(f))?)?;
        merge(&mut base, over);
    }
    Ok(base)
}

fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, o) => *b = o,
    }
}

#[test]
fn rendered_chart_grants_least_privilege_and_mounts_only_configured_paths() -> Result<()> {
    let helm = Helm::new(&tools()?)?;
    let default = objects(&helm.template("cairn-system", &[])?)?;
    check_rendered(&default, &merged_values(None)?)?;
    let custom_file = chart_dir().join("ci/custom-values.yaml");
    let custom = objects(&helm.template(
        "cairn-system",
        &[
            "-f",
            custom_file.to_str().unwrap(),
            "--api-versions",
            "monitoring.coreos.com/v1/ServiceMonitor",
        ],
    )?)?;
    check_rendered(&custom, &merged_values(Some("ci/custom-values.yaml"))?)?;
    Ok(())
}

// ------------------------------------------------------------ real cluster

/// A minimal ServiceMonitor CRD, so the server can admit the chart's ServiceMonitors.
const SERVICE_MONITOR_CRD: &str = r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: servicemonitors.monitoring.coreos.com
spec:
  group: monitoring.coreos.com
  names: {kind: ServiceMonitor, listKind: ServiceMonitorList, plural: servicemonitors, singular: servicemonitor}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [selector, endpoints]
            x-kubernetes-preserve-unknown-fields: true
"#;

#[tokio::test(flavor = "multi_thread")]
async fn rendered_chart_is_accepted_by_the_api_server() -> Result<()> {
    let env = TestEnv::new("chart-dry-run").await?;
    let helm = Helm::new(&env.cp.tools)?;
    let (ok, _, err) =
        env.kubectl_stdin(&["apply", "--server-side", "-f", "-"], SERVICE_MONITOR_CRD)?;
    ensure!(ok, "installing the ServiceMonitor CRD: {err}");
    let out = env
        .kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/servicemonitors.monitoring.coreos.com",
        ])
        .output()?;
    ensure!(out.status.success(), "{}", text(&out));

    let custom = chart_dir().join("ci/custom-values.yaml");
    for (case, extra) in [
        ("default values", vec![]),
        (
            "custom values",
            vec![
                "-f",
                custom.to_str().unwrap(),
                "--api-versions",
                "monitoring.coreos.com/v1/ServiceMonitor",
            ],
        ),
    ] {
        let rendered = helm.template(&env.namespace, &extra)?;
        let count = objects(&rendered)?.len();
        let (ok, out, err) =
            env.kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], &rendered)?;
        assert!(
            ok,
            "{case}: the API server rejected the rendered chart: {err}"
        );
        let accepted = out
            .lines()
            .filter(|l| l.contains("(server dry run)"))
            .count();
        assert_eq!(
            accepted, count,
            "{case}: {count} objects rendered, {accepted} accepted:\n{out}"
        );
        assert!(count >= 14, "{case}: only {count} objects rendered");
    }
    Ok(())
}

/// Runs `kubectl auth can-i` as `user` in the env's namespace: true for yes.
/// `resource` may name an object (`leases/cairn-operator`) or, after `#`, a
/// subresource (`qemuinstances.cairn.dev#status`).
fn can_i(env: &TestEnv, user: &str, verb: &str, resource: &str) -> Result<bool> {
    let (resource, sub) = match resource.split_once('#') {
        Some((r, s)) => (r, Some(format!("--subresource={s}"))),
        None => (resource, None),
    };
    let mut args = vec!["auth", "can-i", verb, resource];
    let as_user = format!("--as={user}");
    args.push(&as_user);
    if let Some(sub) = &sub {
        args.push(sub);
    }
    let out = env.kubectl(&args).output()?;
    match String::from_utf8_lossy(&out.stdout).trim() {
        "yes" => Ok(true),
        "no" => Ok(false),
        other => bail!(
            "kubectl auth can-i {verb} {resource} as {user}: {other:?} {}",
            text(&out)
        ),
    }
}

fn release_name(env: &TestEnv) -> String {
    // Namespaces are `<test>-<random>`; cluster-scoped objects carry the release name.
    format!("cairn-{}", env.namespace.rsplit('-').next().unwrap())
}

fn helm_install(env: &TestEnv, helm: &Helm, release: &str, extra: &[&str]) -> Result<()> {
    let kubeconfig = env.cp.kubeconfig.display().to_string();
    let chart = chart_dir();
    let mut args = vec![
        "install",
        release,
        chart.to_str().unwrap(),
        "--namespace",
        &env.namespace,
        "--kubeconfig",
        &kubeconfig,
        // The harness installed the same CRDs already (byte-identical, see above).
        "--skip-crds",
    ];
    // The tests share one API server, where every release's policy would refuse
    // the others' operators: only the test that asks for it installs one.
    if !extra.iter().any(|a| a.contains("admissionPolicy")) {
        args.extend_from_slice(&["--set", "admissionPolicy.enabled=false"]);
    }
    args.extend_from_slice(extra);
    let out = helm.run(&args)?;
    ensure!(out.status.success(), "helm install: {}", text(&out));
    ensure!(
        text(&out).contains("STATUS: deployed"),
        "helm install: {}",
        text(&out)
    );
    Ok(())
}

fn wait_until(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if check()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting until {what}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn helm_install_upgrade_and_uninstall_with_least_privilege_service_accounts() -> Result<()> {
    let env = TestEnv::new("chart-install").await?;
    let helm = Helm::new(&env.cp.tools)?;
    let release = release_name(&env);
    helm_install(&env, &helm, &release, &[])?;
    let kubeconfig = env.cp.kubeconfig.display().to_string();

    let get = |args: &[&str]| -> Result<String> {
        let out = env.kubectl(args).output()?;
        ensure!(out.status.success(), "kubectl {args:?}: {}", text(&out));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let selector = format!("app.kubernetes.io/instance={release}");
    let names = get(&[
        "get",
        "deploy,ds,sa,svc,role,rolebinding,pdb",
        "-l",
        &selector,
        "-o",
        "name",
    ])?;
    for want in [
        format!("deployment.apps/{release}-operator"),
        format!("daemonset.apps/{release}-agent"),
        format!("serviceaccount/{release}-operator"),
        format!("serviceaccount/{release}-agent"),
        format!("service/{release}-operator-metrics"),
        format!("service/{release}-agent-metrics"),
        format!("role.rbac.authorization.k8s.io/{release}-operator-leader-election"),
        format!("rolebinding.rbac.authorization.k8s.io/{release}-operator-leader-election"),
        format!("poddisruptionbudget.policy/{release}-operator"),
    ] {
        assert!(
            names.lines().any(|l| l == want),
            "{want} not installed; have:\n{names}"
        );
    }
    let cluster = get(&[
        "get",
        "clusterrole,clusterrolebinding",
        "-l",
        &selector,
        "-o",
        "name",
    ])?;
    assert_eq!(
        cluster.lines().count(),
        6,
        "cluster-scoped objects:\n{cluster}"
    );
    assert_eq!(
        get(&[
            "get",
            "deploy",
            &format!("{release}-operator"),
            "-o",
            "jsonpath={.spec.replicas}"
        ])?,
        "2"
    );

    // The service accounts of the release, as the API server authorizes them.
    let agent = format!("system:serviceaccount:{}:{release}-agent", env.namespace);
    let operator = format!("system:serviceaccount:{}:{release}-operator", env.namespace);
    let checks: &[(&str, &str, &str, bool)] = &[
        (&agent, "patch", "qemuinstances.cairn.dev", true),
        (&agent, "create", "qemuinstances.cairn.dev", true),
        (&agent, "patch", "qemuinstances.cairn.dev#status", true),
        (
            &agent,
            "patch",
            "virtualmachinebackups.cairn.dev#status",
            true,
        ),
        (&agent, "watch", "virtualmachinecheckpoints.cairn.dev", true),
        (&agent, "create", "events.events.k8s.io", true),
        (&agent, "delete", "secrets", false),
        // Repository credentials: readable in the release namespace only.
        (&agent, "get", "secrets", true),
        (&agent, "list", "secrets", false),
        (&agent, "get", "backuprepositories.cairn.dev", true),
        (&agent, "patch", "backuprepositories.cairn.dev", false),
        (
            &agent,
            "create",
            "virtualmachinecheckpoints.cairn.dev",
            false,
        ),
        (
            &agent,
            "patch",
            "virtualmachinecheckpoints.cairn.dev",
            false,
        ),
        (&agent, "delete", "virtualmachinebackups.cairn.dev", false),
        (&agent, "get", "nodes", false),
        (&operator, "patch", "virtualmachinebackups.cairn.dev", true),
        (&operator, "delete", "virtualmachinebackups.cairn.dev", true),
        (
            &operator,
            "create",
            "virtualmachinecheckpoints.cairn.dev",
            true,
        ),
        (
            &operator,
            "patch",
            "virtualmachinecheckpoints.cairn.dev#status",
            true,
        ),
        (&operator, "list", "qemuinstances.cairn.dev", true),
        (&operator, "create", "events", true),
        (&operator, "create", "qemuinstances.cairn.dev", false),
        (&operator, "patch", "qemuinstances.cairn.dev", false),
        (&operator, "patch", "qemuinstances.cairn.dev#status", false),
        (&agent, "delete", "qemuinstances.cairn.dev#status", false),
        (&operator, "get", "secrets", true),
        (&operator, "list", "secrets", false),
        (
            &operator,
            "patch",
            "backuprepositories.cairn.dev#status",
            true,
        ),
        (&operator, "patch", "backuprepositories.cairn.dev", false),
        (
            &operator,
            "watch",
            "virtualmachinebackupschedules.cairn.dev",
            true,
        ),
        (
            &operator,
            "patch",
            "virtualmachinebackupschedules.cairn.dev#status",
            true,
        ),
        (
            &operator,
            "patch",
            "virtualmachinebackupschedules.cairn.dev",
            false,
        ),
        (&operator, "create", "leases.coordination.k8s.io", true),
        (
            &operator,
            "update",
            "leases.coordination.k8s.io/cairn-operator",
            true,
        ),
        (
            &operator,
            "update",
            "leases.coordination.k8s.io/someone-else",
            false,
        ),
    ];
    for (user, verb, resource, want) in checks {
        let got = can_i(&env, user, verb, resource)?;
        let who = user.rsplit(':').next().unwrap();
        assert_eq!(
            got, *want,
            "{who} {verb} {resource}: expected {want}, got {got}"
        );
    }
    // Secrets of a tenant namespace: the agent cannot read them at all; the
    // operator can create and delete (TCP export credentials) but not read.
    for (user, verb, want) in [
        (&agent, "get", "no"),
        (&agent, "list", "no"),
        (&agent, "create", "no"),
        (&operator, "get", "no"),
        (&operator, "list", "no"),
        (&operator, "watch", "no"),
        (&operator, "create", "yes"),
        (&operator, "delete", "yes"),
    ] {
        let out = env
            .kubectl(&[
                "auth",
                "can-i",
                verb,
                "secrets",
                "-n",
                "default",
                &format!("--as={user}"),
            ])
            .output()?;
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            want,
            "{user} {verb} secrets in namespace default"
        );
    }
    // The lease permissions are namespaced: not in another namespace.
    let out = env
        .kubectl(&[
            "auth",
            "can-i",
            "create",
            "leases.coordination.k8s.io",
            "-n",
            "default",
            &format!("--as={operator}"),
        ])
        .output()?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "no",
        "operator may create leases outside its namespace"
    );

    // Upgrade changes what the values say.
    let chart = chart_dir();
    let out = helm.run(&[
        "upgrade",
        &release,
        chart.to_str().unwrap(),
        "--namespace",
        &env.namespace,
        "--kubeconfig",
        &kubeconfig,
        "--skip-crds",
        "--reuse-values",
        "--set",
        "operator.replicas=3",
        "--set",
        "logLevel=debug",
    ])?;
    assert!(out.status.success(), "helm upgrade: {}", text(&out));
    assert_eq!(
        get(&[
            "get",
            "deploy",
            &format!("{release}-operator"),
            "-o",
            "jsonpath={.spec.replicas}"
        ])?,
        "3"
    );
    let log = get(&[
        "get",
        "ds",
        &format!("{release}-agent"),
        "-o",
        "jsonpath={.spec.template.spec.containers[0].env[?(@.name==\"RUST_LOG\")].value}",
    ])?;
    assert_eq!(log, "debug");

    // Uninstall removes every object, namespaced and cluster-scoped; the CRDs stay.
    let out = helm.run(&[
        "uninstall",
        &release,
        "--namespace",
        &env.namespace,
        "--kubeconfig",
        &kubeconfig,
        "--wait",
    ])?;
    assert!(out.status.success(), "helm uninstall: {}", text(&out));
    wait_until(
        "the release's objects are gone",
        Duration::from_secs(60),
        || {
            let left = get(&[
                "get",
                "deploy,ds,sa,svc,role,rolebinding,pdb",
                "-l",
                &selector,
                "-o",
                "name",
            ])? + &get(&[
                "get",
                "clusterrole,clusterrolebinding",
                "-l",
                &selector,
                "-o",
                "name",
            ])?;
            Ok(left.trim().is_empty())
        },
    )?;
    let crds = get(&[
        "get",
        "crd",
        "-l",
        "app.kubernetes.io/part-of=cairn",
        "-o",
        "name",
    ])?;
    assert_eq!(
        crds.lines().count(),
        cairn_api::crds().len(),
        "CRDs must survive uninstall: {crds}"
    );
    Ok(())
}

/// kubectl that authenticates only with a bearer token (no client certificate,
/// no kubeconfig user).
struct TokenKubectl {
    kubectl: PathBuf,
    server: String,
    ca: PathBuf,
    token: String,
    empty_config: tempfile::NamedTempFile,
}

impl TokenKubectl {
    fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<(bool, String)> {
        use std::io::Write;
        let mut child = Command::new(&self.kubectl)
            .arg(format!(
                "--kubeconfig={}",
                self.empty_config.path().display()
            ))
            .arg(format!("--server={}", self.server))
            .arg(format!("--certificate-authority={}", self.ca.display()))
            .arg(format!("--token={}", self.token))
            .args(args)
            .env_remove("KUBECONFIG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.unwrap_or("").as_bytes())?;
        let out = child.wait_with_output()?;
        Ok((out.status.success(), text(&out)))
    }

    fn expect_ok(&self, what: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let (ok, out) = self.run(args, stdin)?;
        ensure!(ok, "tenant should be allowed to {what}, but: {out}");
        Ok(out)
    }

    fn expect_forbidden(&self, what: &str, args: &[&str], stdin: Option<&str>) -> Result<()> {
        let (ok, out) = self.run(args, stdin)?;
        ensure!(
            !ok,
            "tenant must not be allowed to {what}, but it succeeded: {out}"
        );
        ensure!(
            out.contains("Forbidden") || out.contains("forbidden"),
            "{what}: failed, but not Forbidden: {out}"
        );
        Ok(())
    }
}

const QEMU_INSTANCE: &str =
    "apiVersion: cairn.dev/v1alpha1\nkind: QemuInstance\nmetadata:\n  name: vm1\n";
const CHECKPOINT: &str = "apiVersion: cairn.dev/v1alpha1\nkind: VirtualMachineCheckpoint\nmetadata:\n  name: cp-tenant\nspec:\n  virtualMachine: vm1\n";

#[tokio::test(flavor = "multi_thread")]
async fn tenants_with_edit_manage_checkpoints_in_their_namespace_and_only_read_qemu_instances()
-> Result<()> {
    let a = TestEnv::new("tenant-a").await?;
    let b = TestEnv::new("tenant-b").await?;
    let helm = Helm::new(&a.cp.tools)?;
    helm_install(&a, &helm, &release_name(&a), &[])?;

    // A tenant identity: a ServiceAccount in A, bound to the built-in `edit` in A only.
    let run = |env: &TestEnv, args: &[&str]| -> Result<String> {
        let out = env.kubectl(args).output()?;
        ensure!(out.status.success(), "kubectl {args:?}: {}", text(&out));
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    run(&a, &["create", "serviceaccount", "tenant"])?;
    run(
        &a,
        &[
            "create",
            "rolebinding",
            "tenant-edit",
            "--clusterrole=edit",
            &format!("--serviceaccount={}:tenant", a.namespace),
        ],
    )?;
    // Objects the tenant will try to reach: a QemuInstance in A and a checkpoint in B (made by the admin).
    for env in [&a, &b] {
        let (ok, _, err) = env.kubectl_stdin(&["apply", "-f", "-"], QEMU_INSTANCE)?;
        ensure!(ok, "admin creating a QemuInstance: {err}");
    }
    let (ok, _, err) = b.kubectl_stdin(&["apply", "-f", "-"], CHECKPOINT)?;
    ensure!(ok, "admin creating a checkpoint in B: {err}");

    // The aggregation controller copies the chart's rules into `edit`.
    let tenant = format!("system:serviceaccount:{}:tenant", a.namespace);
    wait_until(
        "`edit` includes Cairn's rules",
        Duration::from_secs(60),
        || can_i(&a, &tenant, "create", "virtualmachinecheckpoints.cairn.dev"),
    )?;
    let token = run(&a, &["create", "token", "tenant", "--duration=10m"])?;
    let k = TokenKubectl {
        kubectl: a.cp.tools.kubectl.clone(),
        server: a.cp.server.clone(),
        ca: a.cp.ca_cert.clone(),
        token,
        empty_config: tempfile::NamedTempFile::new()?,
    };
    let (na, nb) = (
        format!("--namespace={}", a.namespace),
        format!("--namespace={}", b.namespace),
    );
    let who = k.expect_ok(
        "ask who it is",
        &[
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username}",
        ],
        None,
    )?;
    assert_eq!(who.trim(), tenant, "the token authenticates as the tenant");

    k.expect_ok(
        "create a checkpoint in A",
        &[&na, "create", "-f", "-"],
        Some(CHECKPOINT),
    )?;
    let got = k.expect_ok(
        "get its checkpoint",
        &[&na, "get", "vmcp", "cp-tenant", "-o", "name"],
        None,
    )?;
    assert!(
        got.contains("virtualmachinecheckpoint.cairn.dev/cp-tenant"),
        "{got}"
    );
    k.expect_ok(
        "list backups in A",
        &[&na, "get", "virtualmachinebackups"],
        None,
    )?;
    k.expect_forbidden(
        "write a checkpoint's status (only Cairn does)",
        &[
            &na,
            "patch",
            "vmcp",
            "cp-tenant",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"phase":"Ready"}}"#,
        ],
        None,
    )?;
    k.expect_ok(
        "delete its checkpoint",
        &[&na, "delete", "vmcp", "cp-tenant", "--wait=false"],
        None,
    )?;
    k.expect_forbidden(
        "get a checkpoint in B",
        &[&nb, "get", "vmcp", "cp-tenant"],
        None,
    )?;
    k.expect_forbidden("list checkpoints in B", &[&nb, "get", "vmcp"], None)?;
    k.expect_forbidden(
        "list checkpoints cluster-wide",
        &["get", "vmcp", "--all-namespaces"],
        None,
    )?;
    k.expect_forbidden(
        "create a checkpoint in B",
        &[&nb, "create", "-f", "-"],
        Some(CHECKPOINT),
    )?;

    let got = k.expect_ok(
        "get a QemuInstance in A",
        &[&na, "get", "qemuinstance", "vm1", "-o", "name"],
        None,
    )?;
    assert!(got.contains("qemuinstance.cairn.dev/vm1"), "{got}");
    let other = QEMU_INSTANCE.replace("vm1", "vm-claimed");
    k.expect_forbidden(
        "create a QemuInstance in A",
        &[&na, "create", "-f", "-"],
        Some(&other),
    )?;
    k.expect_forbidden(
        "create a QemuInstance in B",
        &[&nb, "create", "-f", "-"],
        Some(&other),
    )?;
    k.expect_forbidden(
        "update a QemuInstance in A",
        &[&na, "label", "qemuinstance", "vm1", "stolen=yes"],
        None,
    )?;
    k.expect_forbidden(
        "patch a QemuInstance's status in A",
        &[
            &na,
            "patch",
            "qemuinstance",
            "vm1",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"nodeName":"evil"}}"#,
        ],
        None,
    )?;
    k.expect_forbidden(
        "delete a QemuInstance in A",
        &[&na, "delete", "qemuinstance", "vm1"],
        None,
    )?;
    k.expect_forbidden(
        "get a QemuInstance in B",
        &[&nb, "get", "qemuinstance", "vm1"],
        None,
    )?;

    // `view` reads everything of Cairn and writes nothing.
    let viewer = format!("system:serviceaccount:{}:viewer", a.namespace);
    run(&a, &["create", "serviceaccount", "viewer"])?;
    run(
        &a,
        &[
            "create",
            "rolebinding",
            "viewer-view",
            "--clusterrole=view",
            &format!("--serviceaccount={}:viewer", a.namespace),
        ],
    )?;
    wait_until(
        "`view` includes Cairn's rules",
        Duration::from_secs(60),
        || can_i(&a, &viewer, "list", "virtualmachinebackups.cairn.dev"),
    )?;
    for (verb, res, want) in [
        ("get", "qemuinstances.cairn.dev", true),
        ("watch", "virtualmachinecheckpoints.cairn.dev", true),
        ("create", "virtualmachinecheckpoints.cairn.dev", false),
        ("delete", "virtualmachinebackups.cairn.dev", false),
    ] {
        assert_eq!(can_i(&a, &viewer, verb, res)?, want, "viewer {verb} {res}");
    }
    // `admin` gets the checkpoint/backup writes but still cannot touch QemuInstances.
    let admin = format!("system:serviceaccount:{}:owner", a.namespace);
    run(
        &a,
        &[
            "create",
            "rolebinding",
            "owner-admin",
            "--clusterrole=admin",
            &format!("--serviceaccount={}:owner", a.namespace),
        ],
    )?;
    wait_until(
        "`admin` includes Cairn's rules",
        Duration::from_secs(60),
        || can_i(&a, &admin, "delete", "virtualmachinebackups.cairn.dev"),
    )?;
    for verb in ["create", "update", "patch", "delete"] {
        assert!(
            !can_i(&a, &admin, verb, "qemuinstances.cairn.dev")?,
            "admin can {verb} qemuinstances"
        );
    }
    Ok(())
}

/// A token of `sa` in `namespace` from the TokenRequest API (`kubectl create token`).
fn service_account_token(env: &TestEnv, namespace: &str, sa: &str) -> Result<String> {
    let out = env
        .kubectl(&["create", "token", sa, "-n", namespace, "--duration=2h"])
        .output()?;
    ensure!(
        out.status.success(),
        "kubectl create token {sa}: {}",
        text(&out)
    );
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// The release's operator and agent, run as local processes with the tokens of
/// the chart's own ServiceAccounts, take a tenant VM through checkpoint → full →
/// incremental → restore → delete. Every API call they make is authorised by the
/// chart's RBAC alone (no kubelet here, so the pods themselves never run).
#[tokio::test(flavor = "multi_thread")]
async fn backup_path_works_under_the_charts_rbac() -> Result<()> {
    use cairn_api::{BackupPhase, CheckpointPhase, VirtualMachineCheckpoint};
    use cairn_e2e::control_plane::{spawn_service, stop_recorded, write_kubeconfig};
    use cairn_e2e::local_cluster::binary;
    use cairn_e2e::scenario::{self, DiskModel, MIB};
    use cairn_e2e::vm::TestVm;

    let env = TestEnv::new("chart-rbac").await?;
    let tenant = TestEnv::on(env.cp, "chart-tenant").await?;
    let helm = Helm::new(&env.cp.tools)?;
    let release = release_name(&env);
    helm_install(
        &env,
        &helm,
        &release,
        &["--set", "admissionPolicy.enabled=true"],
    )?;
    tokio::task::spawn_blocking(cairn_e2e::harness::build_binaries).await??;

    let dir = std::env::temp_dir().join(format!("cairn-chart-rbac-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (qmp, backups, run) = (dir.join("qmp"), dir.join("backups"), dir.join("run"));
    for d in [&qmp, &backups, &run] {
        std::fs::create_dir_all(d)?;
    }
    let mut kubeconfigs = Vec::new();
    for component in ["operator", "agent"] {
        let token = service_account_token(&env, &env.namespace, &format!("{release}-{component}"))?;
        let path = dir.join(format!("{component}.kubeconfig"));
        write_kubeconfig(&path, &env.cp.server, &env.cp.ca_cert, &token)?;
        kubeconfigs.push(path.display().to_string());
    }
    let owner = Some(std::process::id());
    spawn_service(
        &dir,
        "operator",
        &binary("cairn-operator"),
        &[],
        &[
            ("KUBECONFIG", kubeconfigs[0].clone()),
            ("POD_NAME", "operator-rbac".into()),
            ("POD_NAMESPACE", env.namespace.clone()),
            ("CAIRN_METRICS_ADDR", "127.0.0.1:0".into()),
            ("RUST_LOG", "info".into()),
        ],
        owner,
    )?;
    spawn_service(
        &dir,
        "agent",
        &binary("cairn-agent"),
        &[],
        &[
            ("KUBECONFIG", kubeconfigs[1].clone()),
            ("NODE_NAME", "node-rbac".into()),
            ("CAIRN_SOCKET_DIR", qmp.display().to_string()),
            ("CAIRN_ALLOWED_ROOTS", backups.display().to_string()),
            ("CAIRN_RUNTIME_DIR", run.display().to_string()),
            ("CAIRN_METRICS_ADDR", "127.0.0.1:0".into()),
            ("CAIRN_RESCAN_SECONDS", "2".into()),
            ("CAIRN_RESYNC_SECONDS", "3".into()),
            ("RUST_LOG", "info".into()),
        ],
        owner,
    )?;

    let result: Result<()> = async {
        let size = 64 * MIB;
        let vm = TestVm::start(
            &qmp,
            &tenant.namespace,
            "vm1",
            &dir.join("vms"),
            &[("disk0", "qcow2", size)],
        )?;
        scenario::wait_instance(&tenant, "vm1", "node-rbac").await?;
        let target = backups.join(&tenant.namespace);
        let mut model = DiskModel::new(size);
        model.write(&vm, "disk0", 0x31, 0, 4 * MIB)?;
        scenario::apply(
            &tenant,
            &scenario::backup_yaml(
                "full",
                "vm1",
                &scenario::push_extra(&target, None, Some("c1")),
            ),
        )?;
        scenario::wait_backup(&tenant, "full", BackupPhase::Succeeded).await?;
        let full = model.sha256();
        scenario::wait_checkpoint(&tenant, "c1", CheckpointPhase::Ready).await?;
        model.write(&vm, "disk0", 0x32, 32 * MIB, MIB)?;
        scenario::apply(
            &tenant,
            &scenario::backup_yaml(
                "inc",
                "vm1",
                &scenario::push_extra(&target, Some("c1"), None),
            ),
        )?;
        scenario::wait_backup(&tenant, "inc", BackupPhase::Succeeded).await?;
        let out = tempfile::tempdir()?;
        assert_eq!(
            scenario::restore(&target, "full", &out.path().join("full.raw"))?,
            full
        );
        assert_eq!(
            scenario::restore(&target, "inc", &out.path().join("inc.raw"))?,
            model.sha256()
        );

        // Only the release's own service accounts may write cairn.dev/ metadata:
        // the admin (and so any tenant) is refused by the chart's policy.
        wait_until(
            "the chart's admission policy refuses cairn.dev/ labels",
            Duration::from_secs(30),
            || {
                let out = tenant
                    .kubectl(&[
                        "label",
                        "vmcp",
                        "c1",
                        "cairn.dev/node=elsewhere",
                        "--overwrite",
                    ])
                    .output()?;
                Ok(!out.status.success() && text(&out).contains("set by Cairn only"))
            },
        )?;
        let routed = tenant
            .kubectl(&[
                "get",
                "vmcp",
                "c1",
                "-o",
                "jsonpath={.metadata.labels.cairn\\.dev/node}",
            ])
            .output()?;
        assert_eq!(String::from_utf8_lossy(&routed.stdout), "node-rbac");

        // Deletion goes through the finalizer handshake under the same RBAC.
        let del = tenant
            .kubectl(&["delete", "vmb,vmcp", "--all", "--timeout=60s"])
            .output()?;
        ensure!(del.status.success(), "delete: {}", text(&del));
        let cps: kube::Api<VirtualMachineCheckpoint> =
            kube::Api::namespaced(tenant.client.clone(), &tenant.namespace);
        cairn_e2e::wait::gone(&cps, "c1", Duration::from_secs(60)).await?;
        assert!(
            vm.bitmaps("disk0")?.is_empty(),
            "bitmaps left: {:?}",
            vm.bitmaps("disk0")?
        );
        Ok(())
    }
    .await;
    stop_recorded(&dir)?;
    let logs = ["operator", "agent"]
        .iter()
        .map(|c| {
            std::fs::read_to_string(dir.join("logs").join(format!("{c}.log"))).unwrap_or_default()
        })
        .collect::<Vec<_>>();
    result.with_context(|| format!("operator log:\n{}\nagent log:\n{}", logs[0], logs[1]))?;
    for (c, log) in ["operator", "agent"].iter().zip(&logs) {
        assert!(
            !log.to_lowercase().contains("forbidden"),
            "{c} was refused something under the chart's RBAC:\n{log}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// No Docker engine runs here, so this runs the Dockerfiles' own build command
/// (`cargo build --release --locked -p <crate>`, read from each Dockerfile) and
/// checks that the binary the final stage copies exists and starts.
#[test]
fn release_binaries_the_dockerfiles_copy_build_and_start() -> Result<()> {
    let ws = workspace()?;
    for (file, krate) in [
        ("operator.Dockerfile", "cairn-operator"),
        ("agent.Dockerfile", "cairn-agent"),
    ] {
        let stages = parse_dockerfile(&repo_root().join("docker").join(file))?;
        let build = stages[0]
            .instructions
            .iter()
            .filter(|(i, _)| i == "RUN")
            .map(|(_, a)| a.clone())
            .find(|a| a.contains("cargo build"))
            .with_context(|| format!("{file}: no cargo build"))?;
        let command = build
            .split("&&")
            .find(|c| c.contains("cargo build"))
            .unwrap()
            .trim()
            .to_string();
        // Drop BuildKit's `--mount=…` options: they precede the command itself.
        let words: Vec<&str> = command
            .split_whitespace()
            .skip_while(|w| *w != "cargo")
            .collect();
        ensure!(
            words.len() > 2,
            "{file}: cannot read the build command from `{command}`"
        );
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(cargo)
            .args(&words[1..])
            .current_dir(repo_root())
            .output()?;
        ensure!(
            out.status.success(),
            "{file}: `{command}` failed: {}",
            text(&out)
        );
        let bin = repo_root().join(&ws.target_dir).join("release").join(krate);
        let help = Command::new(&bin).arg("--help").output()?;
        ensure!(
            help.status.success(),
            "{} --help: {}",
            bin.display(),
            text(&help)
        );
        assert!(
            text(&help).contains("Usage"),
            "{}: {}",
            bin.display(),
            text(&help)
        );
    }
    Ok(())
}
