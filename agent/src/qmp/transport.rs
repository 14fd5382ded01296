//! The QMP wire protocol over a unix socket, owned by one background task.
//!
//! [`QmpClient`] is a cheap, cloneable handle. A background task owns the
//! socket: it performs the greeting and `qmp_capabilities`, writes commands
//! with numeric ids (several may be in flight), routes replies by id, and
//! fans events out on a [`tokio::sync::broadcast`] channel. Lines it does not
//! understand (garbage, replies without id, unknown events, unknown fields)
//! are logged and skipped; they never end the session. When the peer goes
//! away the task fails every in-flight command with
//! [`QmpError::Disconnected`] and, if enabled, reconnects with exponential
//! backoff. The task ends when the last handle is dropped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::{Instant, sleep, timeout, timeout_at};
use tracing::{Instrument, debug, info, info_span, warn};

/// Errors of the QMP transport.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be reached, or the session dropped while the
    /// command was queued or in flight (QEMU quit, was killed, or restarted).
    #[error(
        "QMP session {socket} is not connected ({reason}); check that QEMU is running and owns this socket"
    )]
    Disconnected {
        /// The QMP socket path.
        socket: PathBuf,
        /// What was observed.
        reason: String,
    },
    /// The client was closed and does not reconnect.
    #[error("QMP session {socket} is closed")]
    Closed {
        /// The QMP socket path.
        socket: PathBuf,
    },
    /// QEMU did not answer in time; the command may still run in QEMU.
    #[error("QMP command {command} on {socket} got no reply within {after:?}")]
    Timeout {
        /// The QMP command name.
        command: String,
        /// The QMP socket path.
        socket: PathBuf,
        /// The time waited.
        after: Duration,
    },
    /// QEMU answered with an error.
    #[error("QEMU rejected {command}: {desc} ({class})")]
    Command {
        /// The QMP command name.
        command: String,
        /// QMP error class, e.g. `GenericError`, `DeviceNotFound`.
        class: String,
        /// QEMU's human readable description.
        desc: String,
    },
    /// The reply could not be decoded into the expected shape.
    #[error("reply to {command} has an unexpected shape")]
    Decode {
        /// The QMP command name.
        command: String,
        /// The decoding failure.
        #[source]
        source: serde_json::Error,
    },
}

impl QmpError {
    /// True when the session is gone (as opposed to QEMU rejecting a command).
    pub fn is_disconnect(&self) -> bool {
        matches!(
            self,
            QmpError::Disconnected { .. } | QmpError::Closed { .. }
        )
    }
}

/// Tunables of a QMP session.
#[derive(Debug, Clone)]
pub struct QmpOptions {
    /// How long a command may wait (queued + in flight) for its reply.
    pub command_timeout: Duration,
    /// How long connecting plus the greeting and capability negotiation may take.
    pub handshake_timeout: Duration,
    /// Reconnect after the peer goes away (QEMU restarted on the same socket).
    pub reconnect: bool,
    /// First reconnect delay; doubles up to `backoff_max`.
    pub backoff_initial: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// Capacity of the event fan-out; slow subscribers lose the oldest events.
    pub event_capacity: usize,
}

impl Default for QmpOptions {
    fn default() -> Self {
        Self {
            command_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(5),
            reconnect: true,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            // Each session allocates it up front: 1024 cost ~100 KiB a VM.
            // Subscribers that lag re-read state, so a short buffer is safe.
            event_capacity: 64,
        }
    }
}

/// One QMP event, kept as data: unknown event names and fields are fine.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// Event name, e.g. `JOB_STATUS_CHANGE`.
    pub name: String,
    /// The event's `data` member (`Null` when absent).
    pub data: Value,
    /// QEMU's timestamp in microseconds since the epoch, when present.
    pub timestamp_us: Option<u64>,
}

impl QmpEvent {
    /// `(job id, status)` for a `JOB_STATUS_CHANGE` event.
    pub fn job_status_change(&self) -> Option<(&str, &str)> {
        if self.name != "JOB_STATUS_CHANGE" {
            return None;
        }
        Some((
            self.data.get("id")?.as_str()?,
            self.data.get("status")?.as_str()?,
        ))
    }
}

/// Connection state of a session, observable through [`QmpClient::state`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionState {
    /// Not connected; connecting or waiting to retry.
    Connecting,
    /// Capabilities negotiated; `generation` increases with every reconnect.
    Connected {
        /// 1 for the first connection, +1 per reconnect.
        generation: u64,
        /// QEMU version from the greeting, e.g. `10.0.2`.
        version: String,
    },
    /// The client is closed (last handle dropped, or reconnect disabled and the peer left).
    Closed,
}

type Reply = oneshot::Sender<Result<Value, QmpError>>;
type Pending = HashMap<u64, (String, Reply)>;

struct Request {
    id: u64,
    line: String,
    reply: oneshot::Sender<Result<Value, QmpError>>,
    command: String,
    /// A descriptor sent with the command line (SCM_RIGHTS), for `add-fd` / `getfd`.
    fd: Option<std::os::fd::OwnedFd>,
}

struct Shared {
    socket: PathBuf,
    options: QmpOptions,
    requests: mpsc::Sender<Request>,
    events: broadcast::Sender<QmpEvent>,
    state: watch::Receiver<ConnectionState>,
    /// Counts successful commands that may have changed QEMU's state.
    changes: watch::Sender<u64>,
    next_id: AtomicU64,
}

/// A handle on one QMP session. Clone it freely; the session ends when the
/// last clone is dropped.
#[derive(Clone)]
pub struct QmpClient {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient")
            .field("socket", &self.shared.socket)
            .field("state", &*self.shared.state.borrow())
            .finish()
    }
}

impl QmpClient {
    /// Starts a session on `socket` and waits until the first handshake
    /// succeeded (or failed; then the error is returned and nothing keeps running).
    pub async fn connect(socket: impl AsRef<Path>, options: QmpOptions) -> Result<Self, QmpError> {
        let client = Self::spawn(socket, options);
        let mut state = client.shared.state.clone();
        let deadline = Instant::now() + client.shared.options.handshake_timeout * 2;
        let outcome = timeout_at(
            deadline,
            state.wait_for(|s| !matches!(s, ConnectionState::Connecting)),
        )
        .await;
        match outcome {
            Ok(Ok(s)) if matches!(*s, ConnectionState::Connected { .. }) => Ok(client),
            _ => Err(QmpError::Disconnected {
                socket: client.shared.socket.clone(),
                reason: "could not connect and negotiate capabilities".into(),
            }),
        }
    }

    /// Starts a session without waiting: commands wait (up to their timeout)
    /// until the socket is reachable. Used by discovery.
    pub fn spawn(socket: impl AsRef<Path>, options: QmpOptions) -> Self {
        let socket = socket.as_ref().to_path_buf();
        let (req_tx, req_rx) = mpsc::channel(64);
        let (ev_tx, _) = broadcast::channel(options.event_capacity.max(1));
        let (state_tx, state_rx) = watch::channel(ConnectionState::Connecting);
        let shared = Arc::new(Shared {
            socket: socket.clone(),
            options: options.clone(),
            requests: req_tx,
            events: ev_tx.clone(),
            state: state_rx,
            changes: watch::Sender::new(0),
            next_id: AtomicU64::new(1),
        });
        let span = info_span!("qmp_session", socket = %socket.display());
        tokio::spawn(session_task(socket, options, req_rx, ev_tx, state_tx).instrument(span));
        Self { shared }
    }

    /// The socket path of this session.
    pub fn socket(&self) -> &Path {
        &self.shared.socket
    }

    /// The options this session runs with.
    pub fn options(&self) -> &QmpOptions {
        &self.shared.options
    }

    /// Watches the connection state.
    pub fn state(&self) -> watch::Receiver<ConnectionState> {
        self.shared.state.clone()
    }

    /// True while connected.
    pub fn is_connected(&self) -> bool {
        matches!(
            *self.shared.state.borrow(),
            ConnectionState::Connected { .. }
        )
    }

    /// QEMU version of the current connection, if connected.
    pub fn qemu_version(&self) -> Option<String> {
        match &*self.shared.state.borrow() {
            ConnectionState::Connected { version, .. } => Some(version.clone()),
            _ => None,
        }
    }

    /// A counter that moves after every successful command through this
    /// handle (or a clone) other than a `query-*`: QEMU emits no event when a
    /// bitmap is added or removed, so watchers of its state look here too.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    /// Subscribes to events; every subscriber sees every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        self.shared.events.subscribe()
    }

    /// Executes a command given by name and JSON arguments; the raw path for
    /// commands whose typed struct is missing from the `qapi` crate.
    pub async fn execute_raw(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.execute_raw_timeout(command, arguments, self.shared.options.command_timeout)
            .await
    }

    /// [`Self::execute_raw`], passing `fd` to QEMU with the command (SCM_RIGHTS
    /// on the QMP socket): what `add-fd` and `getfd` take.
    pub async fn execute_with_fd(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: std::os::fd::OwnedFd,
    ) -> Result<Value, QmpError> {
        self.send_command(
            command,
            arguments,
            self.shared.options.command_timeout,
            Some(fd),
        )
        .await
    }

    /// [`Self::execute_raw`] with an explicit timeout.
    pub async fn execute_raw_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        limit: Duration,
    ) -> Result<Value, QmpError> {
        self.send_command(command, arguments, limit, None).await
    }

    async fn send_command(
        &self,
        command: &str,
        arguments: Option<Value>,
        limit: Duration,
        fd: Option<std::os::fd::OwnedFd>,
    ) -> Result<Value, QmpError> {
        let deadline = Instant::now() + limit;
        let socket = &self.shared.socket;
        let mut state = self.shared.state.clone();
        let ready = timeout_at(
            deadline,
            state.wait_for(|s| !matches!(s, ConnectionState::Connecting)),
        )
        .await
        // Read the state now: the watch guard must not live across an await (Send).
        .map(|r| r.map(|s| *s == ConnectionState::Closed));
        match ready {
            Err(_) => {
                return Err(QmpError::Disconnected {
                    socket: socket.clone(),
                    reason: format!("no connection within {limit:?}"),
                });
            }
            Ok(Err(_)) => {
                return Err(QmpError::Closed {
                    socket: socket.clone(),
                });
            }
            Ok(Ok(true)) => {
                return Err(QmpError::Closed {
                    socket: socket.clone(),
                });
            }
            Ok(Ok(false)) => {}
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments.filter(|a| !a.is_null()) {
            msg["arguments"] = args;
        }
        let (tx, rx) = oneshot::channel();
        let request = Request {
            id,
            line: msg.to_string(),
            reply: tx,
            command: command.to_string(),
            fd,
        };
        debug!(command, id, "qmp send");
        if self.shared.requests.send(request).await.is_err() {
            return Err(QmpError::Closed {
                socket: socket.clone(),
            });
        }
        match timeout_at(deadline, rx).await {
            Err(_) => Err(QmpError::Timeout {
                command: command.to_string(),
                socket: socket.clone(),
                after: limit,
            }),
            Ok(Err(_)) => Err(QmpError::Disconnected {
                socket: socket.clone(),
                reason: "session ended before the reply".into(),
            }),
            Ok(Ok(r)) => {
                if r.is_ok() && !command.starts_with("query-") {
                    self.shared.changes.send_modify(|n| *n += 1);
                }
                r
            }
        }
    }
}

/// How long a failing connection is retried at [`FAST_RETRY_PACE`] before
/// the delay starts at `backoff_initial` and doubles.
const FAST_RETRY_WINDOW: Duration = Duration::from_secs(5);

/// The retry delay within [`FAST_RETRY_WINDOW`] (or `backoff_initial`, if shorter).
const FAST_RETRY_PACE: Duration = Duration::from_millis(20);

async fn session_task(
    socket: PathBuf,
    options: QmpOptions,
    mut requests: mpsc::Receiver<Request>,
    events: broadcast::Sender<QmpEvent>,
    state: watch::Sender<ConnectionState>,
) {
    let mut backoff = options.backoff_initial;
    let mut generation = 0u64;
    // Since when connecting has failed without a success in between.
    let mut failing_since: Option<Instant> = None;
    loop {
        if requests.is_closed() {
            break;
        }
        match timeout(options.handshake_timeout, handshake(&socket)).await {
            Ok(Ok((reader, writer, version))) => {
                generation += 1;
                backoff = options.backoff_initial;
                failing_since = None;
                info!(generation, version = %version, "qmp connected");
                state.send_replace(ConnectionState::Connected {
                    generation,
                    version,
                });
                let ended = serve(&socket, reader, writer, &mut requests, &events).await;
                state.send_replace(ConnectionState::Connecting);
                match ended {
                    ServeEnd::HandlesDropped => break,
                    ServeEnd::PeerGone(reason) => warn!(%reason, "qmp connection lost"),
                }
            }
            Ok(Err(e)) => debug!(error = %e, "qmp connect failed"),
            Err(_) => debug!("qmp handshake timed out"),
        }
        if !options.reconnect {
            break;
        }
        // A socket file exists from QEMU's bind() but accepts only after its
        // listen(), which a QEMU starting among many others reaches late: the
        // first seconds retry at a fast pace, so the VM is seen within moments
        // of listening; only a longer failure backs off.
        let since = *failing_since.get_or_insert_with(Instant::now);
        let fast = since.elapsed() < FAST_RETRY_WINDOW;
        let delay = if fast {
            FAST_RETRY_PACE.min(backoff)
        } else {
            backoff
        };
        // Sleep, but notice when every handle is gone.
        let wake = Instant::now() + delay;
        while Instant::now() < wake {
            if requests.is_closed() {
                state.send_replace(ConnectionState::Closed);
                return;
            }
            sleep(Duration::from_millis(50).min(delay)).await;
        }
        if !fast {
            backoff = (backoff * 2).min(options.backoff_max);
        }
    }
    state.send_replace(ConnectionState::Closed);
    // Fail whatever is still queued.
    requests.close();
    while let Ok(r) = requests.try_recv() {
        let _ = r.reply.send(Err(QmpError::Closed {
            socket: socket.clone(),
        }));
    }
}

async fn handshake(
    socket: &Path,
) -> std::io::Result<(
    tokio::io::Lines<BufReader<OwnedReadHalf>>,
    OwnedWriteHalf,
    String,
)> {
    let stream = UnixStream::connect(socket).await?;
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    let invalid = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    // Greeting: the first JSON object with a `QMP` member; skip garbage.
    let version = loop {
        let line = lines
            .next_line()
            .await?
            .ok_or_else(|| invalid("closed before greeting"))?;
        if let Ok(v) = serde_json::from_str::<Value>(&line)
            && let Some(q) = v.get("QMP")
        {
            let ver = &q["version"]["qemu"];
            break format!("{}.{}.{}", ver["major"], ver["minor"], ver["micro"]);
        }
    };
    w.write_all(b"{\"execute\":\"qmp_capabilities\",\"id\":0}\n")
        .await?;
    loop {
        let line = lines
            .next_line()
            .await?
            .ok_or_else(|| invalid("closed during capability negotiation"))?;
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if v.get("id") == Some(&json!(0)) {
            if v.get("return").is_some() {
                return Ok((lines, w, version));
            }
            return Err(invalid(&format!("qmp_capabilities failed: {v}")));
        }
    }
}

enum ServeEnd {
    HandlesDropped,
    PeerGone(String),
}

async fn serve(
    socket: &Path,
    mut lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    mut writer: OwnedWriteHalf,
    requests: &mut mpsc::Receiver<Request>,
    events: &broadcast::Sender<QmpEvent>,
) -> ServeEnd {
    let mut pending: Pending = HashMap::new();
    let end = loop {
        tokio::select! {
            req = requests.recv() => {
                let Some(req) = req else { break ServeEnd::HandlesDropped };
                if req.reply.is_closed() {
                    // The caller gave up (timeout) while the command was queued: never send it late.
                    continue;
                }
                let mut line = req.line.into_bytes();
                line.push(b'\n');
                let write = async {
                    let mut rest: &[u8] = &line;
                    if let Some(fd) = &req.fd {
                        let sent = send_with_fd(&writer, rest, fd).await?;
                        rest = &rest[sent..];
                    }
                    writer.write_all(rest).await
                };
                match timeout(Duration::from_secs(10), write).await {
                    Ok(Ok(())) => { pending.insert(req.id, (req.command, req.reply)); }
                    Ok(Err(e)) => {
                        let _ = req.reply.send(Err(QmpError::Disconnected { socket: socket.to_path_buf(), reason: e.to_string() }));
                        break ServeEnd::PeerGone(e.to_string());
                    }
                    Err(_) => {
                        let _ = req.reply.send(Err(QmpError::Disconnected { socket: socket.to_path_buf(), reason: "write blocked".into() }));
                        break ServeEnd::PeerGone("write blocked for 10s".into());
                    }
                }
            }
            line = lines.next_line() => {
                match line {
                    Ok(Some(line)) => dispatch(&line, &mut pending, events),
                    Ok(None) => break ServeEnd::PeerGone("peer closed the socket".into()),
                    Err(e) => break ServeEnd::PeerGone(e.to_string()),
                }
            }
        }
    };
    for (_, (command, reply)) in pending.drain() {
        let _ = reply.send(Err(QmpError::Disconnected {
            socket: socket.to_path_buf(),
            reason: format!("connection lost while {command} was in flight"),
        }));
    }
    end
}

/// Sends (a first part of) `bytes` with `fd` attached as SCM_RIGHTS; returns
/// how many bytes went out.
async fn send_with_fd(
    writer: &OwnedWriteHalf,
    bytes: &[u8],
    fd: &std::os::fd::OwnedFd,
) -> std::io::Result<usize> {
    use std::os::fd::AsFd;
    let stream: &UnixStream = writer.as_ref();
    loop {
        stream.writable().await?;
        let r = stream.try_io(tokio::io::Interest::WRITABLE, || {
            let fds = [fd.as_fd()];
            let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
            control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds));
            rustix::net::sendmsg(
                stream,
                &[std::io::IoSlice::new(bytes)],
                &mut control,
                rustix::net::SendFlags::NOSIGNAL,
            )
            .map_err(std::io::Error::from)
        });
        match r {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

fn dispatch(line: &str, pending: &mut Pending, events: &broadcast::Sender<QmpEvent>) {
    let Ok(msg) = serde_json::from_str::<Value>(line) else {
        warn!(line = %truncate(line), "qmp: skipping a line that is not JSON");
        return;
    };
    if let Some(name) = msg.get("event").and_then(Value::as_str) {
        let ts = &msg["timestamp"];
        let timestamp_us = match (ts["seconds"].as_u64(), ts["microseconds"].as_u64()) {
            (Some(s), Some(us)) => Some(s * 1_000_000 + us),
            _ => None,
        };
        debug!(event = name, "qmp event");
        let _ = events.send(QmpEvent {
            name: name.to_string(),
            data: msg.get("data").cloned().unwrap_or(Value::Null),
            timestamp_us,
        });
        return;
    }
    let Some(id) = msg.get("id").and_then(Value::as_u64) else {
        warn!(line = %truncate(line), "qmp: skipping a message without id or event");
        return;
    };
    let Some((command, reply)) = pending.remove(&id) else {
        debug!(id, "qmp: reply for a command nobody waits for");
        return;
    };
    let result = if let Some(ret) = msg.get("return") {
        Ok(ret.clone())
    } else if let Some(err) = msg.get("error") {
        Err(QmpError::Command {
            command,
            class: err["class"].as_str().unwrap_or("Unknown").to_string(),
            desc: err["desc"].as_str().unwrap_or("").to_string(),
        })
    } else {
        warn!(id, "qmp: reply with neither return nor error");
        Ok(Value::Null)
    };
    let _ = reply.send(result);
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(200) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
