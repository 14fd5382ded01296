//! A QEMU guest agent client, for `quiesce`: freeze the guest's filesystems
//! around the instant a checkpoint or backup is taken, then thaw them.
//!
//! Discovery convention (DESIGN.md): a launcher that gives the guest an agent
//! channel puts its host socket beside the monitor, `<namespace>/<vm>.qga.sock`.
//!
//! The guest agent has no request ids and may still hold a reply to a request
//! of an earlier, abandoned session, so every session starts with
//! `guest-sync-delimited` (as libvirt does): a `0xFF` byte resets the agent's
//! parser, and everything before the `0xFF` the agent sends back, and every
//! reply without our random id, is discarded.
//!
//! Every call has a hard deadline. A thaw always follows a freeze that may
//! have happened — also when the freeze timed out (a late freeze would
//! otherwise leave the guest frozen) — each on a fresh session.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::time::timeout_at;
use tracing::{info, warn};

/// The guest agent socket of the VM whose QMP socket is `qmp_socket`
/// (`<dir>/<vm>.sock` → `<dir>/<vm>.qga.sock`).
pub fn socket_beside(qmp_socket: &Path) -> PathBuf {
    let stem = qmp_socket
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".sock"))
        .unwrap_or_default();
    qmp_socket.with_file_name(format!("{stem}{}", crate::discovery::GUEST_AGENT_SUFFIX))
}

/// Guest agent failures. `Unavailable` means nothing answers on the socket's
/// side (no channel, nothing listening); `Timeout` means something is
/// connected but the guest agent did not answer in time.
#[derive(Debug, thiserror::Error)]
pub enum QgaError {
    /// No guest agent channel for this VM.
    #[error("VM {vm} has no QEMU guest agent channel at {}: {reason}", socket.display())]
    Unavailable {
        /// VM (`namespace/name`).
        vm: String,
        /// The socket tried.
        socket: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The guest agent did not answer within the deadline.
    #[error("the QEMU guest agent of VM {vm} did not answer {command} within {timeout:?}")]
    Timeout {
        /// VM (`namespace/name`).
        vm: String,
        /// The command that got no answer.
        command: String,
        /// The deadline.
        timeout: Duration,
    },
    /// The guest agent answered with an error or garbage.
    #[error("the QEMU guest agent of VM {vm} refused {command}: {message}")]
    Refused {
        /// VM (`namespace/name`).
        vm: String,
        /// The command.
        command: String,
        /// The agent's error description.
        message: String,
    },
}

impl QgaError {
    /// A stable reason for conditions.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unavailable { .. } => "QuiesceUnavailable",
            Self::Timeout { .. } => "QuiesceTimeout",
            Self::Refused { .. } => "QuiesceFailed",
        }
    }
}

/// The guest agent of one VM.
#[derive(Debug, Clone)]
pub struct GuestAgent {
    vm: String,
    socket: PathBuf,
    timeout: Duration,
}

/// What a quiesced operation reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuiesceReport {
    /// Filesystems the guest froze.
    pub frozen_filesystems: u64,
    /// From the freeze reply to the thaw reply.
    pub frozen_for: Duration,
    /// Set when the thaw failed even on a second session: the data taken is
    /// consistent, but the guest may still be frozen.
    pub thaw_error: Option<String>,
}

struct Session {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl GuestAgent {
    /// The agent of `vm` (`namespace/name`) at `socket`; each call (sync,
    /// freeze, thaw) gets `timeout`.
    pub fn new(vm: impl Into<String>, socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            vm: vm.into(),
            socket: socket.into(),
            timeout,
        }
    }

    /// The socket this client uses.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn timeout_error(&self, command: &str) -> QgaError {
        QgaError::Timeout {
            vm: self.vm.clone(),
            command: command.into(),
            timeout: self.timeout,
        }
    }

    async fn open(&self) -> Result<Session, QgaError> {
        let unavailable = |reason: String| QgaError::Unavailable {
            vm: self.vm.clone(),
            socket: self.socket.clone(),
            reason,
        };
        let meta = std::fs::symlink_metadata(&self.socket)
            .map_err(|e| unavailable(format!("no socket ({e})")))?;
        if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
            return Err(unavailable("not a unix socket".into()));
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let stream = timeout_at(deadline, UnixStream::connect(&self.socket))
            .await
            .map_err(|_| self.timeout_error("connect"))?
            .map_err(|e| unavailable(format!("cannot connect ({e})")))?;
        let (r, writer) = stream.into_split();
        let mut session = Session {
            reader: BufReader::new(r),
            writer,
        };
        timeout_at(deadline, self.sync(&mut session))
            .await
            .map_err(|_| self.timeout_error("guest-sync-delimited"))??;
        Ok(session)
    }

    async fn sync(&self, s: &mut Session) -> Result<(), QgaError> {
        // Not a secret: only distinct from ids of earlier sessions.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let id = (nanos ^ std::process::id().rotate_left(16)) & 0x7fff_ffff;
        let msg = json!({"execute": "guest-sync-delimited", "arguments": {"id": id}});
        let mut bytes = vec![0xff];
        bytes.extend_from_slice(msg.to_string().as_bytes());
        bytes.push(b'\n');
        self.send(s, "guest-sync-delimited", &bytes).await?;
        loop {
            // Skip to the agent's delimiter, then read its reply line.
            loop {
                let b = s.reader.read_u8().await.map_err(|e| self.closed(e))?;
                if b == 0xff {
                    break;
                }
            }
            let line = self.read_line(s, "guest-sync-delimited").await?;
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && v.get("return").and_then(Value::as_u64) == Some(u64::from(id))
            {
                return Ok(());
            }
        }
    }

    fn closed(&self, e: std::io::Error) -> QgaError {
        QgaError::Unavailable {
            vm: self.vm.clone(),
            socket: self.socket.clone(),
            reason: format!("the channel closed ({e})"),
        }
    }

    async fn send(&self, s: &mut Session, command: &str, bytes: &[u8]) -> Result<(), QgaError> {
        s.writer
            .write_all(bytes)
            .await
            .map_err(|e| QgaError::Unavailable {
                vm: self.vm.clone(),
                socket: self.socket.clone(),
                reason: format!("cannot send {command} ({e})"),
            })
    }

    async fn read_line(&self, s: &mut Session, command: &str) -> Result<String, QgaError> {
        let mut line = String::new();
        let n = s
            .reader
            .read_line(&mut line)
            .await
            .map_err(|e| self.closed(e))?;
        if n == 0 {
            return Err(QgaError::Unavailable {
                vm: self.vm.clone(),
                socket: self.socket.clone(),
                reason: format!("the channel closed while waiting for {command}"),
            });
        }
        Ok(line)
    }

    /// Runs one command on a synced session; returns its `return` value.
    async fn execute(&self, s: &mut Session, command: &str) -> Result<Value, QgaError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let run = async {
            let mut bytes = json!({"execute": command}).to_string().into_bytes();
            bytes.push(b'\n');
            self.send(s, command, &bytes).await?;
            loop {
                let line = self.read_line(s, command).await?;
                let line = line.trim_start_matches('\u{ff}');
                let Ok(v) = serde_json::from_str::<Value>(line) else {
                    continue;
                };
                if let Some(r) = v.get("return") {
                    return Ok(r.clone());
                }
                if let Some(e) = v.get("error") {
                    return Err(QgaError::Refused {
                        vm: self.vm.clone(),
                        command: command.into(),
                        message: e
                            .get("desc")
                            .and_then(Value::as_str)
                            .unwrap_or("unknown error")
                            .to_string(),
                    });
                }
            }
        };
        timeout_at(deadline, run)
            .await
            .map_err(|_| self.timeout_error(command))?
    }

    /// `guest-ping` on a fresh session: whether an agent answers.
    pub async fn ping(&self) -> Result<(), QgaError> {
        let mut s = self.open().await?;
        self.execute(&mut s, "guest-ping").await.map(|_| ())
    }

    /// `guest-fsfreeze-status`: `thawed` or `frozen`.
    pub async fn freeze_status(&self) -> Result<String, QgaError> {
        let mut s = self.open().await?;
        let v = self.execute(&mut s, "guest-fsfreeze-status").await?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    /// Thaws the guest's filesystems on a fresh session; returns how many
    /// were thawed (0 when none was frozen).
    pub async fn thaw(&self) -> Result<u64, QgaError> {
        let mut s = self.open().await?;
        let v = self.execute(&mut s, "guest-fsfreeze-thaw").await?;
        Ok(v.as_u64().unwrap_or(0))
    }

    /// Runs `op` with the guest's filesystems frozen, and thaws them
    /// whatever happens (op failed, freeze timed out). An error of the
    /// freeze means `op` did not run (and a thaw was sent); once `op` ran,
    /// its result comes back with a report, which says if the thaw failed.
    pub async fn quiesced<T, F>(&self, op: F) -> Result<(T, QuiesceReport), QgaError>
    where
        F: Future<Output = T>,
    {
        let mut session = self.open().await?;
        let frozen = match self.execute(&mut session, "guest-fsfreeze-freeze").await {
            Ok(v) => v.as_u64().unwrap_or(0),
            Err(e) => {
                // A freeze may still land after the deadline (or half-done on
                // an error): thaw in any case.
                drop(session);
                self.thaw_logged().await;
                return Err(e);
            }
        };
        let frozen_at = Instant::now();
        let out = op.await;
        let mut thawed = self
            .execute(&mut session, "guest-fsfreeze-thaw")
            .await
            .map(|_| ());
        let mut frozen_for = frozen_at.elapsed();
        if let Err(e) = &thawed {
            warn!(vm = %self.vm, error = %e, "thaw failed; retrying on a new session");
            drop(session);
            thawed = self.thaw().await.map(|_| ());
            frozen_for = frozen_at.elapsed();
        }
        match &thawed {
            Ok(()) => {
                info!(vm = %self.vm, filesystems = frozen, ms = frozen_for.as_millis() as u64, "guest filesystems frozen and thawed")
            }
            Err(e) => warn!(vm = %self.vm, error = %e, "cannot thaw the guest"),
        }
        Ok((
            out,
            QuiesceReport {
                frozen_filesystems: frozen,
                frozen_for,
                thaw_error: thawed.err().map(|e| e.to_string()),
            },
        ))
    }

    async fn thaw_logged(&self) {
        match self.thaw().await {
            Ok(n) if n > 0 => warn!(vm = %self.vm, filesystems = n, "thawed a late freeze"),
            Ok(_) => {}
            Err(e) => warn!(vm = %self.vm, error = %e, "cannot thaw the guest"),
        }
    }
}
