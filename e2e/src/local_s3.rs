//! The local cluster's object storage: a real versitygw S3 server on a free
//! loopback port with its data under `$CAIRN_STATE_DIR/s3/data`, and one bucket.
//!
//! The root credentials are random, made the first time a state directory is
//! used, and kept in `$CAIRN_STATE_DIR/s3/credentials.env` (mode 0600) as the
//! very `export …` line `cargo xtask cluster up` prints, so a shell can `source`
//! it and any later command (or a restarted cluster on the same data) reads the
//! same values back with [`LocalS3::load`].

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cairn_repo::test_support::BucketAccess;

use crate::control_plane::{free_port, kill_recorded, recorded_pid, spawn_service};
use crate::tools::Tools;

/// Bucket the local cluster creates.
pub const BUCKET: &str = "cairn";
/// Name the server is recorded under in `$CAIRN_STATE_DIR/pids` (and its log file).
pub const SERVICE: &str = "versitygw";

/// The running local S3 server and the credentials it accepts.
#[derive(Clone, PartialEq, Eq)]
pub struct LocalS3 {
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    /// The bucket ([`BUCKET`]).
    pub bucket: String,
    /// Root access key id.
    pub access_key_id: String,
    /// Root secret access key.
    pub secret_access_key: String,
}

impl fmt::Debug for LocalS3 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalS3")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// `$CAIRN_STATE_DIR/s3`.
pub fn s3_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("s3")
}

fn credentials_file(state_dir: &Path) -> PathBuf {
    s3_dir(state_dir).join("credentials.env")
}

/// `len` random letters and digits (nothing a shell or a CLI flag parser trips on).
fn random_token(len: usize) -> String {
    use rand::Rng;
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

impl LocalS3 {
    /// Starts versitygw for `state_dir` (tied to `owner` like the other services),
    /// reusing the credentials of an earlier start, and creates the bucket.
    pub fn start(tools: &Tools, state_dir: &Path, owner: Option<u32>) -> Result<Self> {
        let data = s3_dir(state_dir).join("data");
        fs::create_dir_all(&data)?;
        let earlier = Self::load(state_dir).ok();
        let (access_key_id, secret_access_key) = match &earlier {
            Some(old) => (old.access_key_id.clone(), old.secret_access_key.clone()),
            None => (random_token(20), random_token(40)),
        };
        let mut last_error = None;
        // The endpoint of an earlier start first (the BackupRepository `local-s3`
        // kept in etcd names it, and its storage is immutable), then free
        // ports: one can be taken between choosing and binding it.
        let mut endpoints = earlier.map(|old| old.endpoint).into_iter();
        for _ in 0..5 {
            let endpoint = match endpoints.next() {
                Some(e) => e,
                None => format!("http://127.0.0.1:{}", free_port()?),
            };
            let s3 = Self {
                endpoint,
                bucket: BUCKET.into(),
                access_key_id: access_key_id.clone(),
                secret_access_key: secret_access_key.clone(),
            };
            match s3.spawn(tools, state_dir, &data, owner) {
                Ok(()) => {
                    s3.access()
                        .create_bucket(&s3.bucket)
                        .with_context(|| format!("creating the bucket {}", s3.bucket))?;
                    s3.save(state_dir)?;
                    return Ok(s3);
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("versitygw did not start")))
    }

    /// Starts the server and waits until it accepts connections.
    fn spawn(
        &self,
        tools: &Tools,
        state_dir: &Path,
        data: &Path,
        owner: Option<u32>,
    ) -> Result<()> {
        let addr = self.endpoint.trim_start_matches("http://").to_string();
        let pid = spawn_service(
            state_dir,
            SERVICE,
            &tools.versitygw,
            &[
                "--port".into(),
                addr.clone(),
                "posix".into(),
                data.display().to_string(),
            ],
            &[
                ("ROOT_ACCESS_KEY", self.access_key_id.clone()),
                ("ROOT_SECRET_KEY", self.secret_access_key.clone()),
            ],
            owner,
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::net::TcpStream::connect(&addr).is_ok() {
                return Ok(());
            }
            let exited = fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true);
            if exited || Instant::now() > deadline {
                if !exited && recorded_pid(state_dir, SERVICE).is_ok() {
                    let _ = kill_recorded(state_dir, SERVICE);
                }
                bail!(
                    "versitygw did not start on {addr}; see {}",
                    state_dir
                        .join("logs")
                        .join(format!("{SERVICE}.log"))
                        .display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Signed bucket requests with the root credentials.
    pub fn access(&self) -> BucketAccess<'_> {
        BucketAccess {
            endpoint: &self.endpoint,
            access_key_id: &self.access_key_id,
            secret_access_key: &self.secret_access_key,
        }
    }

    /// The shell line `export CAIRN_S3_ENDPOINT=… CAIRN_S3_BUCKET=… AWS_ACCESS_KEY_ID=… AWS_SECRET_ACCESS_KEY=…`.
    pub fn export_line(&self) -> String {
        format!(
            "export CAIRN_S3_ENDPOINT={} CAIRN_S3_BUCKET={} AWS_ACCESS_KEY_ID={} AWS_SECRET_ACCESS_KEY={}",
            self.endpoint, self.bucket, self.access_key_id, self.secret_access_key
        )
    }

    /// Parses an [`export_line`](Self::export_line).
    pub fn parse_export_line(line: &str) -> Result<Self> {
        let vars: std::collections::BTreeMap<&str, &str> = line
            .trim()
            .strip_prefix("export ")
            .context("not an export line")?
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .collect();
        let get = |k: &str| -> Result<String> {
            vars.get(k)
                .map(|v| v.to_string())
                .with_context(|| format!("{k} is missing from {line:?}"))
        };
        Ok(Self {
            endpoint: get("CAIRN_S3_ENDPOINT")?,
            bucket: get("CAIRN_S3_BUCKET")?,
            access_key_id: get("AWS_ACCESS_KEY_ID")?,
            secret_access_key: get("AWS_SECRET_ACCESS_KEY")?,
        })
    }

    /// The server settings recorded for `state_dir` by the last start.
    pub fn load(state_dir: &Path) -> Result<Self> {
        let path = credentials_file(state_dir);
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse_export_line(&text)
    }

    fn save(&self, state_dir: &Path) -> Result<()> {
        let path = credentials_file(state_dir);
        let mut f = fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        writeln!(f, "{}", self.export_line())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_line_round_trips_and_names_the_four_variables() {
        let s3 = LocalS3 {
            endpoint: "http://127.0.0.1:7070".into(),
            bucket: BUCKET.into(),
            access_key_id: random_token(20),
            secret_access_key: random_token(40),
        };
        let line = s3.export_line();
        assert!(line.starts_with("export CAIRN_S3_ENDPOINT=http://127.0.0.1:7070 CAIRN_S3_BUCKET=cairn AWS_ACCESS_KEY_ID="));
        assert!(line.contains(" AWS_SECRET_ACCESS_KEY="));
        assert_eq!(LocalS3::parse_export_line(&line).unwrap(), s3);
        assert!(LocalS3::parse_export_line("export KUBECONFIG=/x").is_err());
        assert!(!format!("{s3:?}").contains(&s3.secret_access_key));
    }

    #[test]
    fn credentials_are_alphanumeric() {
        let t = random_token(40);
        assert_eq!(t.len(), 40);
        assert!(t.chars().all(|c| c.is_ascii_alphanumeric()));
    }
}
