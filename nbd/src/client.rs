//! An async NBD client: fixed newstyle handshake, structured replies, metadata
//! contexts, and many requests in flight on one connection.
//!
//! How the parts talk: [`Client::connect`] runs the handshake on the caller's
//! task, then splits the stream. A *writer task* owns the write half and sends
//! request headers handed to it over a channel (so a caller dropping its future
//! can never leave half a header on the wire). A *reader task* owns the read
//! half, parses every reply and chunk, and completes the matching request
//! through the table of pending requests, keyed by cookie. [`Client`] is a
//! cheap clone; its methods take `&self` and may run concurrently.
//!
//! Dropping the last [`Client`] clone ends the connection with `NBD_CMD_DISC`;
//! [`Client::disconnect`] does the same after waiting for requests in flight.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use futures::future::try_join_all;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, ToSocketAddrs, UnixStream};
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::debug;

use crate::proto::{self, Cursor, Extent, cmd, cmd_flag, info, opt, rep, reply};

/// What can go wrong talking to an NBD server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket failed.
    #[error("NBD connection I/O failed")]
    Io(#[from] io::Error),
    /// The server sent something the protocol does not allow.
    #[error("the NBD server broke the protocol: {0}")]
    Protocol(String),
    /// The server lacks a feature the client needs.
    #[error("the NBD server does not support {0}")]
    Unsupported(&'static str),
    /// The export name is unknown to the server.
    #[error("the NBD server has no export named {name:?}{}", message_suffix(.message))]
    UnknownExport {
        /// The export asked for.
        name: String,
        /// The server's explanation, if any.
        message: String,
    },
    /// The server refused an option during the handshake.
    #[error("the NBD server refused {} with {}{}", proto::option_name(*.option), proto::reply_type_name(*.reply), message_suffix(.message))]
    OptionRefused {
        /// The option (`NBD_OPT_*`).
        option: u32,
        /// The error reply (`NBD_REP_ERR_*`).
        reply: u32,
        /// The server's explanation, if any.
        message: String,
    },
    /// A metadata context the caller asked for was not granted (e.g. the
    /// dirty bitmap is not part of the export).
    #[error("the NBD server did not grant metadata context {0:?}; is the bitmap exported?")]
    MetaContextUnavailable(String),
    /// A block status query named a context that was not negotiated.
    #[error("metadata context {0:?} was not negotiated on this connection")]
    ContextNotNegotiated(String),
    /// The request does not fit the export or its block size constraints.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The server answered the request with an error.
    #[error("the NBD server failed the request with {}{}", proto::errno_name(*.errno), message_suffix(.message))]
    Request {
        /// The NBD error number (`NBD_E*`).
        errno: u32,
        /// The server's explanation, if any.
        message: String,
        /// The offset the error is about, when the server said.
        offset: Option<u64>,
    },
    /// The connection is closed (by [`Client::disconnect`], by the server, or after an error).
    #[error("the NBD connection is closed: {0}")]
    Disconnected(String),
}

fn message_suffix(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

/// What to ask for during the handshake.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The export to select (empty = the server's default export).
    pub export_name: String,
    /// Metadata contexts to select, e.g. [`proto::BASE_ALLOCATION`] or
    /// `qemu:dirty-bitmap:<name>`; every one must be granted or connecting fails.
    pub meta_contexts: Vec<String>,
    /// Negotiate structured replies (needed for holes, read errors and block status).
    pub structured_replies: bool,
}

impl ConnectOptions {
    /// Options for `export_name` with structured replies and no metadata context.
    pub fn new(export_name: impl Into<String>) -> Self {
        Self {
            export_name: export_name.into(),
            meta_contexts: Vec::new(),
            structured_replies: true,
        }
    }

    /// Adds a metadata context to select.
    pub fn meta_context(mut self, context: impl Into<String>) -> Self {
        self.meta_contexts.push(context.into());
        self
    }
}

/// A metadata context granted by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContext {
    /// The server's id for this connection.
    pub id: u32,
    /// Its name.
    pub name: String,
}

/// What the handshake learned about the export.
#[derive(Debug, Clone)]
pub struct ExportInfo {
    /// The export name used.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags ([`proto::transmission`]).
    pub flags: u16,
    /// Minimum block size: offsets and lengths must be multiples of it.
    pub min_block: u32,
    /// Preferred block size.
    pub preferred_block: u32,
    /// Largest read payload the client sends in one request (at most 32 MiB).
    pub max_payload: u32,
    /// Whether structured replies were negotiated.
    pub structured_replies: bool,
    /// Granted metadata contexts.
    pub meta_contexts: Vec<MetaContext>,
    /// The server's description of the export, if it gave one.
    pub description: Option<String>,
}

impl ExportInfo {
    /// Whether the server marks the export read-only.
    pub fn read_only(&self) -> bool {
        self.flags & proto::transmission::READ_ONLY != 0
    }

    /// Whether several connections may be used on this export at once.
    pub fn can_multi_conn(&self) -> bool {
        self.flags & proto::transmission::CAN_MULTI_CONN != 0
    }
}

/// An export listed by `NBD_OPT_LIST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedExport {
    /// Export name.
    pub name: String,
    /// Free-form description (may be empty).
    pub description: String,
}

/// The extents of one `NBD_CMD_BLOCK_STATUS` reply, per granted context.
#[derive(Debug, Clone, Default)]
pub struct BlockStatus {
    /// Context name and its extents, in reply order; offsets are absolute.
    pub contexts: Vec<(String, Vec<Extent>)>,
}

impl BlockStatus {
    /// The extents reported for `context`, if it was in the reply.
    pub fn get(&self, context: &str) -> Option<&[Extent]> {
        self.contexts
            .iter()
            .find(|(name, _)| name == context)
            .map(|(_, v)| v.as_slice())
    }
}

/// An NBD connection in transmission phase. Clones share the connection.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("export", &self.inner.info.name)
            .field("size", &self.inner.info.size)
            .finish()
    }
}

struct Inner {
    info: ExportInfo,
    outgoing: mpsc::UnboundedSender<Outgoing>,
    shared: Arc<Shared>,
    next_cookie: AtomicU64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // A soft disconnect; the writer task ends after sending it.
        let _ = self.outgoing.send(Outgoing::Disconnect);
    }
}

enum Outgoing {
    Request([u8; proto::REQUEST_HEADER_LEN]),
    /// A request header followed by its payload (`NBD_CMD_WRITE`).
    WithPayload([u8; proto::REQUEST_HEADER_LEN], Vec<u8>),
    Disconnect,
}

/// State shared by callers, the reader task and the writer task.
struct Shared {
    pending: Mutex<PendingTable>,
    /// Signalled when the table empties and when the connection closes.
    changed: Notify,
    disconnecting: AtomicBool,
}

#[derive(Default)]
struct PendingTable {
    requests: HashMap<u64, Pending>,
    /// Why the connection closed, once it has.
    closed: Option<String>,
}

struct Pending {
    offset: u64,
    length: u32,
    error: Option<ClientError>,
    kind: PendingKind,
}

enum PendingKind {
    Read {
        /// Filled front to back; chunks in order append without zeroing first.
        buf: BytesMut,
        covered: u64,
        reply: oneshot::Sender<Result<Vec<u8>, ClientError>>,
    },
    BlockStatus {
        status: BlockStatus,
        reply: oneshot::Sender<Result<BlockStatus, ClientError>>,
    },
    /// A command whose reply carries no data (write, flush, cache).
    Command {
        reply: oneshot::Sender<Result<(), ClientError>>,
    },
}

impl Pending {
    fn complete(self) {
        match self.kind {
            PendingKind::Read {
                buf,
                covered,
                reply,
            } => {
                let result = match self.error {
                    Some(e) => Err(e),
                    None if covered != u64::from(self.length) => {
                        Err(ClientError::Protocol(format!(
                            "the read of {} bytes at {} was answered with only {covered} bytes",
                            self.length, self.offset
                        )))
                    }
                    None => {
                        let mut buf = buf;
                        // Out-of-order chunks can leave the length short of the end.
                        buf.resize(self.length as usize, 0);
                        Ok(Vec::from(buf))
                    }
                };
                let _ = reply.send(result);
            }
            PendingKind::BlockStatus { status, reply } => {
                let _ = reply.send(match self.error {
                    Some(e) => Err(e),
                    None => Ok(status),
                });
            }
            PendingKind::Command { reply } => {
                let _ = reply.send(match self.error {
                    Some(e) => Err(e),
                    None => Ok(()),
                });
            }
        }
    }

    fn fail(self, error: ClientError) {
        match self.kind {
            PendingKind::Read { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            PendingKind::BlockStatus { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            PendingKind::Command { reply } => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

impl Client {
    /// Connects to a unix socket and runs the handshake.
    pub async fn connect_unix(
        path: impl AsRef<Path>,
        options: &ConnectOptions,
    ) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).await?;
        let (r, w) = stream.into_split();
        Self::connect(r, w, options).await
    }

    /// Connects over TCP (no TLS) and runs the handshake.
    pub async fn connect_tcp(
        addr: impl ToSocketAddrs,
        options: &ConnectOptions,
    ) -> Result<Self, ClientError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        Self::connect(r, w, options).await
    }

    /// Runs the handshake over an already connected stream, given as its two
    /// halves, and starts the reader and writer tasks.
    pub async fn connect<R, W>(
        read: R,
        write: W,
        options: &ConnectOptions,
    ) -> Result<Self, ClientError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut read = BufReader::with_capacity(256 * 1024, read);
        let mut write = write;
        let info = handshake(&mut read, &mut write, options).await?;
        debug!(export = %info.name, size = info.size, flags = info.flags, structured = info.structured_replies, "NBD handshake done");
        let shared = Arc::new(Shared {
            pending: Mutex::new(PendingTable::default()),
            changed: Notify::new(),
            disconnecting: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(write, rx, shared.clone()));
        let contexts: HashMap<u32, String> = info
            .meta_contexts
            .iter()
            .map(|c| (c.id, c.name.clone()))
            .collect();
        tokio::spawn(read_loop(read, shared.clone(), contexts));
        Ok(Self {
            inner: Arc::new(Inner {
                info,
                outgoing: tx,
                shared,
                next_cookie: AtomicU64::new(1),
            }),
        })
    }

    /// What the handshake learned about the export.
    pub fn info(&self) -> &ExportInfo {
        &self.inner.info
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.inner.info.size
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<(), ClientError> {
        let info = &self.inner.info;
        if offset.checked_add(length).is_none_or(|end| end > info.size) {
            return Err(ClientError::InvalidRequest(format!(
                "{length} bytes at offset {offset} reach past the end of the export ({} bytes)",
                info.size
            )));
        }
        let align = u64::from(info.min_block.max(1));
        if !offset.is_multiple_of(align)
            || (!length.is_multiple_of(align) && offset + length != info.size)
        {
            return Err(ClientError::InvalidRequest(format!(
                "offset {offset} and length {length} must be multiples of the export's minimum block size {align}"
            )));
        }
        Ok(())
    }

    /// Registers a request and queues its header for the writer task.
    fn submit(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        pending: PendingKind,
    ) -> Result<(), ClientError> {
        self.submit_with(kind, flags, offset, length, pending, None)
    }

    /// Like `submit`, with an optional payload sent after the header.
    fn submit_with(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        pending: PendingKind,
        payload: Option<Vec<u8>>,
    ) -> Result<(), ClientError> {
        let cookie = self.inner.next_cookie.fetch_add(1, Ordering::Relaxed);
        {
            let mut table = self
                .inner
                .shared
                .pending
                .lock()
                .expect("pending table poisoned");
            if let Some(reason) = &table.closed {
                return Err(ClientError::Disconnected(reason.clone()));
            }
            if self.inner.shared.disconnecting.load(Ordering::Acquire) {
                return Err(ClientError::Disconnected(
                    "the client is disconnecting".into(),
                ));
            }
            table.requests.insert(
                cookie,
                Pending {
                    offset,
                    length,
                    error: None,
                    kind: pending,
                },
            );
        }
        let header = proto::encode_request(flags, kind, cookie, offset, length);
        let message = match payload {
            Some(data) => Outgoing::WithPayload(header, data),
            None => Outgoing::Request(header),
        };
        if self.inner.outgoing.send(message).is_err() {
            let pending = self
                .inner
                .shared
                .pending
                .lock()
                .expect("pending table poisoned")
                .requests
                .remove(&cookie);
            if let Some(p) = pending {
                p.fail(ClientError::Disconnected(
                    "the writer task has ended".into(),
                ));
            }
        }
        Ok(())
    }

    /// Reads `length` bytes at `offset`. Holes come back as zeroes. Reads
    /// larger than the maximum payload are split into requests that are all
    /// in flight at once.
    pub async fn read(&self, offset: u64, length: usize) -> Result<Vec<u8>, ClientError> {
        self.check_range(offset, length as u64)?;
        let max = self.inner.info.max_payload as usize;
        if length <= max {
            return self.read_one(offset, length as u32).await;
        }
        let pieces = (0..length).step_by(max).map(|start| {
            let len = max.min(length - start);
            self.read_one(offset + start as u64, len as u32)
        });
        let parts = try_join_all(pieces).await?;
        Ok(parts.concat())
    }

    async fn read_one(&self, offset: u64, length: u32) -> Result<Vec<u8>, ClientError> {
        if length == 0 {
            return Ok(Vec::new());
        }
        let (tx, rx) = oneshot::channel();
        let pending = PendingKind::Read {
            buf: BytesMut::with_capacity(length as usize),
            covered: 0,
            reply: tx,
        };
        self.submit(cmd::READ, 0, offset, length, pending)?;
        rx.await
            .map_err(|_| ClientError::Disconnected("the reader task has ended".into()))?
    }

    /// Writes `data` at `offset` (`NBD_CMD_WRITE`, at most the maximum
    /// payload). A read-only export answers `EPERM`.
    pub async fn write(&self, offset: u64, data: Vec<u8>) -> Result<(), ClientError> {
        self.check_range(offset, data.len() as u64)?;
        if data.len() > self.inner.info.max_payload as usize {
            return Err(ClientError::InvalidRequest(format!(
                "a write of {} bytes exceeds the maximum payload of {}",
                data.len(),
                self.inner.info.max_payload
            )));
        }
        let (tx, rx) = oneshot::channel();
        let length = data.len() as u32;
        self.submit_with(
            cmd::WRITE,
            0,
            offset,
            length,
            PendingKind::Command { reply: tx },
            Some(data),
        )?;
        rx.await
            .map_err(|_| ClientError::Disconnected("the reader task has ended".into()))?
    }

    /// Queries the granted metadata contexts for `length` bytes at `offset`
    /// (`NBD_CMD_BLOCK_STATUS`). The server may describe less than asked (or,
    /// for the last extent, more); with `req_one` each context gets exactly one
    /// extent no longer than `length`.
    pub async fn block_status(
        &self,
        offset: u64,
        length: u32,
        req_one: bool,
    ) -> Result<BlockStatus, ClientError> {
        if self.inner.info.meta_contexts.is_empty() {
            return Err(ClientError::InvalidRequest(
                "block status needs a metadata context selected when connecting".into(),
            ));
        }
        if length == 0 {
            return Err(ClientError::InvalidRequest(
                "block status of zero bytes".into(),
            ));
        }
        self.check_range(offset, u64::from(length))?;
        let (tx, rx) = oneshot::channel();
        let pending = PendingKind::BlockStatus {
            status: BlockStatus::default(),
            reply: tx,
        };
        let flags = if req_one { cmd_flag::REQ_ONE } else { 0 };
        self.submit(cmd::BLOCK_STATUS, flags, offset, length, pending)?;
        rx.await
            .map_err(|_| ClientError::Disconnected("the reader task has ended".into()))?
    }

    /// All extents of `context` over the whole export, merged where adjacent
    /// extents share flags, by iterating `NBD_CMD_BLOCK_STATUS` from offset 0.
    pub async fn extents(&self, context: &str) -> Result<Vec<Extent>, ClientError> {
        if !self
            .inner
            .info
            .meta_contexts
            .iter()
            .any(|c| c.name == context)
        {
            return Err(ClientError::ContextNotNegotiated(context.to_string()));
        }
        let size = self.size();
        let align = u64::from(self.inner.info.min_block.max(512));
        // Large queries (rounded to the block size) keep the number of round trips low.
        let max_query = (1u64 << 31) / align * align;
        let mut out = Vec::new();
        let mut offset = 0;
        while offset < size {
            let length = (size - offset).min(max_query) as u32;
            let status = self.block_status(offset, length, false).await?;
            let extents = status.get(context).ok_or_else(|| {
                ClientError::Protocol(format!("a block status reply lacked context {context:?}"))
            })?;
            let mut next = offset;
            for e in extents {
                let end = e.end().min(size);
                if end <= next {
                    continue;
                }
                proto::push_merged(
                    &mut out,
                    Extent {
                        offset: next,
                        length: end - next,
                        flags: e.flags,
                    },
                );
                next = end;
            }
            if next == offset {
                return Err(ClientError::Protocol(format!(
                    "block status at offset {offset} made no progress"
                )));
            }
            offset = next;
        }
        Ok(out)
    }

    /// The dirty extents of a whole export for a dirty-bitmap context such as
    /// `qemu:dirty-bitmap:<name>`: the extents whose [`proto::state::DIRTY`] flag is set.
    pub async fn dirty_extents(&self, context: &str) -> Result<Vec<Extent>, ClientError> {
        Ok(self
            .extents(context)
            .await?
            .into_iter()
            .filter(|e| e.flags & proto::state::DIRTY != 0)
            .collect())
    }

    /// Waits for every request in flight, then ends the connection with
    /// `NBD_CMD_DISC` and waits for the server to close it. Later requests on
    /// any clone fail with [`ClientError::Disconnected`].
    pub async fn disconnect(&self) -> Result<(), ClientError> {
        let shared = &self.inner.shared;
        shared.disconnecting.store(true, Ordering::Release);
        loop {
            let notified = shared.changed.notified();
            {
                let table = shared.pending.lock().expect("pending table poisoned");
                if table.requests.is_empty() || table.closed.is_some() {
                    break;
                }
            }
            notified.await;
        }
        let _ = self.inner.outgoing.send(Outgoing::Disconnect);
        loop {
            let notified = shared.changed.notified();
            if shared
                .pending
                .lock()
                .expect("pending table poisoned")
                .closed
                .is_some()
            {
                return Ok(());
            }
            notified.await;
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut write: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    shared: Arc<Shared>,
) {
    let mut buf = Vec::with_capacity(64 * proto::REQUEST_HEADER_LEN);
    let mut disconnect = false;
    while let Some(first) = rx.recv().await {
        buf.clear();
        let mut next = Some(first);
        // Batch everything queued into one write.
        while let Some(msg) = next.take() {
            match msg {
                Outgoing::Request(h) => buf.extend_from_slice(&h),
                Outgoing::WithPayload(h, data) => {
                    buf.extend_from_slice(&h);
                    buf.extend_from_slice(&data);
                }
                Outgoing::Disconnect => {
                    buf.extend_from_slice(&proto::encode_request(0, cmd::DISC, 0, 0, 0));
                    disconnect = true;
                    break;
                }
            }
            if buf.len() < 256 * proto::REQUEST_HEADER_LEN {
                next = rx.try_recv().ok();
            }
        }
        if let Err(e) = write.write_all(&buf).await {
            close_all(&shared, format!("writing to the server failed: {e}"));
            return;
        }
        if disconnect {
            break;
        }
    }
    let _ = write.flush().await;
    let _ = write.shutdown().await;
}

/// Marks the connection closed and fails every pending request.
fn close_all(shared: &Shared, reason: String) {
    let drained: Vec<Pending> = {
        let mut table = shared.pending.lock().expect("pending table poisoned");
        if table.closed.is_none() {
            table.closed = Some(reason.clone());
        }
        table.requests.drain().map(|(_, p)| p).collect()
    };
    for p in drained {
        p.fail(ClientError::Disconnected(reason.clone()));
    }
    shared.changed.notify_waiters();
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut read: BufReader<R>,
    shared: Arc<Shared>,
    contexts: HashMap<u32, String>,
) {
    let reason = match read_replies(&mut read, &shared, &contexts).await {
        Ok(()) => "the server closed the connection".to_string(),
        Err(e) => {
            let detail = match &e {
                ClientError::Io(io) => format!("reading from the server failed: {io}"),
                other => other.to_string(),
            };
            if !shared.disconnecting.load(Ordering::Acquire) {
                tracing::warn!(error = %detail, "NBD connection lost");
            }
            detail
        }
    };
    close_all(&shared, reason);
}

fn take_pending(shared: &Shared, cookie: u64) -> Result<Pending, ClientError> {
    shared
        .pending
        .lock()
        .expect("pending table poisoned")
        .requests
        .remove(&cookie)
        .ok_or_else(|| {
            ClientError::Protocol(format!(
                "a reply named cookie {cookie}, which is not in flight"
            ))
        })
}

fn finish(shared: &Shared, cookie: u64, pending: Pending, done: bool) {
    if done {
        pending.complete();
        if shared
            .pending
            .lock()
            .expect("pending table poisoned")
            .requests
            .is_empty()
        {
            shared.changed.notify_waiters();
        }
    } else {
        shared
            .pending
            .lock()
            .expect("pending table poisoned")
            .requests
            .insert(cookie, pending);
    }
}

async fn read_replies<R: AsyncRead + Unpin>(
    read: &mut BufReader<R>,
    shared: &Shared,
    contexts: &HashMap<u32, String>,
) -> Result<(), ClientError> {
    loop {
        let magic = match read.read_u32().await {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        match magic {
            proto::SIMPLE_REPLY_MAGIC => {
                let error = read.read_u32().await?;
                let cookie = read.read_u64().await?;
                let mut pending = take_pending(shared, cookie)?;
                if error != 0 {
                    pending.error = Some(ClientError::Request {
                        errno: error,
                        message: String::new(),
                        offset: None,
                    });
                } else if let PendingKind::Read { buf, covered, .. } = &mut pending.kind {
                    let n = pending.length as usize;
                    read_into(read, buf, 0, n).await?;
                    *covered = n as u64;
                }
                finish(shared, cookie, pending, true);
            }
            proto::STRUCTURED_REPLY_MAGIC => {
                let flags = read.read_u16().await?;
                let kind = read.read_u16().await?;
                let cookie = read.read_u64().await?;
                let length = read.read_u32().await?;
                let mut pending = take_pending(shared, cookie)?;
                read_chunk(read, &mut pending, kind, length, contexts).await?;
                finish(shared, cookie, pending, flags & reply::FLAG_DONE != 0);
            }
            other => {
                return Err(ClientError::Protocol(format!(
                    "unknown reply magic {other:#010x}"
                )));
            }
        }
    }
}

/// Reads `n` bytes from the stream into `buf[at..at + n]`: appended straight
/// into spare capacity when `at` is the current end (the usual, in-order
/// case), otherwise into a zero-filled region.
async fn read_into<R: AsyncRead + Unpin>(
    read: &mut R,
    buf: &mut BytesMut,
    at: usize,
    n: usize,
) -> io::Result<()> {
    if at < buf.len() {
        let end = at + n;
        if end > buf.len() {
            buf.resize(end, 0);
        }
        return read.read_exact(&mut buf[at..end]).await.map(|_| ());
    }
    buf.resize(at, 0);
    buf.reserve(n);
    let mut left = n as u64;
    while left > 0 {
        let got = read.take(left).read_buf(buf).await?;
        if got == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        left -= got as u64;
    }
    Ok(())
}

async fn read_payload<R: AsyncRead + Unpin>(
    read: &mut R,
    length: u32,
    limit: u32,
) -> Result<Vec<u8>, ClientError> {
    if length > limit {
        return Err(ClientError::Protocol(format!(
            "a reply chunk of {length} bytes exceeds the limit of {limit}"
        )));
    }
    let mut payload = vec![0; length as usize];
    read.read_exact(&mut payload).await?;
    Ok(payload)
}

async fn read_chunk<R: AsyncRead + Unpin>(
    read: &mut R,
    pending: &mut Pending,
    kind: u16,
    length: u32,
    contexts: &HashMap<u32, String>,
) -> Result<(), ClientError> {
    let req_start = pending.offset;
    let req_end = pending.offset + u64::from(pending.length);
    let bad = |what: &str| ClientError::Protocol(what.to_string());
    match (kind, &mut pending.kind) {
        (reply::NONE, _) => {
            if length != 0 {
                return Err(bad("an NBD_REPLY_TYPE_NONE chunk carried a payload"));
            }
        }
        (reply::OFFSET_DATA, PendingKind::Read { buf, covered, .. }) => {
            if length < 9 {
                return Err(bad("an OFFSET_DATA chunk was shorter than 9 bytes"));
            }
            let offset = read.read_u64().await?;
            let data_len = u64::from(length - 8);
            if offset < req_start || offset + data_len > req_end {
                return Err(bad("an OFFSET_DATA chunk lay outside its read request"));
            }
            let at = (offset - req_start) as usize;
            read_into(read, buf, at, data_len as usize).await?;
            *covered += data_len;
        }
        (reply::OFFSET_HOLE, PendingKind::Read { buf, covered, .. }) => {
            if length != 12 {
                return Err(bad("an OFFSET_HOLE chunk was not 12 bytes long"));
            }
            let offset = read.read_u64().await?;
            let hole = u64::from(read.read_u32().await?);
            if hole == 0 || offset < req_start || offset + hole > req_end {
                return Err(bad("an OFFSET_HOLE chunk lay outside its read request"));
            }
            let (at, end) = (
                (offset - req_start) as usize,
                (offset - req_start + hole) as usize,
            );
            if end > buf.len() {
                buf.truncate(at.min(buf.len()));
                buf.resize(end, 0);
            } else {
                buf[at..end].fill(0);
            }
            *covered += hole;
        }
        (reply::BLOCK_STATUS, PendingKind::BlockStatus { status, .. }) => {
            // 2^20 extents is the most a server should send in one chunk.
            let payload = read_payload(read, length, 4 + 8 * (1 << 20) + 8).await?;
            if payload.len() < 12 || !(payload.len() - 4).is_multiple_of(8) {
                return Err(bad("a BLOCK_STATUS chunk had a malformed length"));
            }
            let mut c = Cursor::new(&payload);
            let id = c.u32().unwrap_or_default();
            let name = contexts.get(&id).ok_or_else(|| {
                bad("a BLOCK_STATUS chunk named a context id that was never granted")
            })?;
            let mut extents = Vec::with_capacity((payload.len() - 4) / 8);
            let mut offset = req_start;
            while c.remaining() >= 8 {
                let len = u64::from(c.u32().unwrap_or_default());
                let flags = c.u32().unwrap_or_default();
                if len == 0 {
                    return Err(bad("a BLOCK_STATUS chunk had an extent of length 0"));
                }
                extents.push(Extent {
                    offset,
                    length: len,
                    flags,
                });
                offset += len;
            }
            status.contexts.push((name.clone(), extents));
        }
        (k, _) if k & reply::ERROR_BIT != 0 => {
            let payload = read_payload(read, length, 64 * 1024).await?;
            let mut c = Cursor::new(&payload);
            let errno = c
                .u32()
                .ok_or_else(|| bad("an error chunk was shorter than 6 bytes"))?;
            let msg_len = c
                .u16()
                .ok_or_else(|| bad("an error chunk was shorter than 6 bytes"))?;
            let message = c
                .bytes(msg_len as usize)
                .map(|m| String::from_utf8_lossy(m).into_owned())
                .ok_or_else(|| bad("an error chunk's message overran the chunk"))?;
            let offset = if k == reply::ERROR_OFFSET {
                c.u64()
            } else {
                None
            };
            if pending.error.is_none() {
                pending.error = Some(ClientError::Request {
                    errno: if errno == 0 {
                        proto::errno::EINVAL
                    } else {
                        errno
                    },
                    message,
                    offset,
                });
            }
        }
        (k, _) => {
            return Err(ClientError::Protocol(format!(
                "unexpected structured reply chunk type {k} for this request"
            )));
        }
    }
    Ok(())
}

/// Reads one option reply: (option, reply type, payload).
async fn read_option_reply<R: AsyncRead + Unpin>(
    read: &mut R,
    expect_option: u32,
) -> Result<(u32, Vec<u8>), ClientError> {
    let magic = read.read_u64().await?;
    if magic != proto::OPTION_REPLY_MAGIC {
        return Err(ClientError::Protocol(format!(
            "bad option reply magic {magic:#x}"
        )));
    }
    let option = read.read_u32().await?;
    let kind = read.read_u32().await?;
    let length = read.read_u32().await?;
    if option != expect_option {
        return Err(ClientError::Protocol(format!(
            "got a reply to {} while waiting for {}",
            proto::option_name(option),
            proto::option_name(expect_option)
        )));
    }
    let payload = read_payload(read, length, 1 << 20).await?;
    Ok((kind, payload))
}

async fn send_option<W: AsyncWrite + Unpin>(
    write: &mut W,
    option: u32,
    data: &[u8],
) -> Result<(), ClientError> {
    let mut msg = Vec::with_capacity(16 + data.len());
    msg.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(data);
    write.write_all(&msg).await?;
    write.flush().await?;
    Ok(())
}

fn refused(option: u32, reply: u32, payload: &[u8]) -> ClientError {
    ClientError::OptionRefused {
        option,
        reply,
        message: String::from_utf8_lossy(payload).into_owned(),
    }
}

/// The first exchange: magics, handshake flags, client flags. Returns whether
/// the server skips the 124 zero bytes.
async fn greet<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    read: &mut R,
    write: &mut W,
) -> Result<bool, ClientError> {
    let magic = read.read_u64().await?;
    if magic != proto::NBD_MAGIC {
        return Err(ClientError::Protocol(format!(
            "the server greeted with {magic:#x}, not NBDMAGIC"
        )));
    }
    let second = read.read_u64().await?;
    if second != proto::IHAVEOPT {
        return Err(ClientError::Unsupported(
            "newstyle negotiation (it spoke oldstyle)",
        ));
    }
    let flags = read.read_u16().await?;
    if flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ClientError::Unsupported("fixed newstyle negotiation"));
    }
    let no_zeroes = flags & proto::FLAG_NO_ZEROES != 0;
    let mut client_flags = proto::FLAG_C_FIXED_NEWSTYLE;
    if no_zeroes {
        client_flags |= proto::FLAG_C_NO_ZEROES;
    }
    write.write_all(&client_flags.to_be_bytes()).await?;
    Ok(no_zeroes)
}

fn meta_context_request(export: &str, queries: &[String]) -> Vec<u8> {
    let mut data = Vec::new();
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        data.extend_from_slice(&(q.len() as u32).to_be_bytes());
        data.extend_from_slice(q.as_bytes());
    }
    data
}

async fn handshake<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    read: &mut R,
    write: &mut W,
    options: &ConnectOptions,
) -> Result<ExportInfo, ClientError> {
    let no_zeroes = greet(read, write).await?;
    let export = options.export_name.as_str();
    let mut info = ExportInfo {
        name: export.to_string(),
        size: 0,
        flags: 0,
        min_block: 1,
        preferred_block: 4096,
        max_payload: proto::MAX_PAYLOAD_DEFAULT,
        structured_replies: false,
        meta_contexts: Vec::new(),
        description: None,
    };

    if options.structured_replies || !options.meta_contexts.is_empty() {
        send_option(write, opt::STRUCTURED_REPLY, &[]).await?;
        let (kind, payload) = read_option_reply(read, opt::STRUCTURED_REPLY).await?;
        match kind {
            rep::ACK => info.structured_replies = true,
            rep::ERR_UNSUP => {}
            other => return Err(refused(opt::STRUCTURED_REPLY, other, &payload)),
        }
    }

    if !options.meta_contexts.is_empty() {
        if !info.structured_replies {
            return Err(ClientError::Unsupported(
                "structured replies, which metadata contexts need",
            ));
        }
        let data = meta_context_request(export, &options.meta_contexts);
        send_option(write, opt::SET_META_CONTEXT, &data).await?;
        loop {
            let (kind, payload) = read_option_reply(read, opt::SET_META_CONTEXT).await?;
            match kind {
                rep::META_CONTEXT => {
                    let mut c = Cursor::new(&payload);
                    let id = c.u32().ok_or_else(|| {
                        ClientError::Protocol("a META_CONTEXT reply was too short".into())
                    })?;
                    let name = String::from_utf8_lossy(c.bytes(c.remaining()).unwrap_or_default())
                        .into_owned();
                    info.meta_contexts.push(MetaContext { id, name });
                }
                rep::ACK => break,
                rep::ERR_UNKNOWN => {
                    return Err(ClientError::UnknownExport {
                        name: export.to_string(),
                        message: String::from_utf8_lossy(&payload).into_owned(),
                    });
                }
                other => return Err(refused(opt::SET_META_CONTEXT, other, &payload)),
            }
        }
        for wanted in &options.meta_contexts {
            if !info.meta_contexts.iter().any(|c| &c.name == wanted) {
                return Err(ClientError::MetaContextUnavailable(wanted.clone()));
            }
        }
    }

    // NBD_OPT_GO, asking for block sizes and the description.
    let mut data = Vec::new();
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&2u16.to_be_bytes());
    data.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    data.extend_from_slice(&info::DESCRIPTION.to_be_bytes());
    send_option(write, opt::GO, &data).await?;
    let mut got_export = false;
    loop {
        let (kind, payload) = read_option_reply(read, opt::GO).await?;
        match kind {
            rep::INFO => {
                let mut c = Cursor::new(&payload);
                let short = || ClientError::Protocol("an NBD_REP_INFO reply was too short".into());
                match c.u16().ok_or_else(short)? {
                    info::EXPORT => {
                        info.size = c.u64().ok_or_else(short)?;
                        info.flags = c.u16().ok_or_else(short)?;
                        got_export = true;
                    }
                    info::BLOCK_SIZE => {
                        info.min_block = c.u32().ok_or_else(short)?.max(1);
                        info.preferred_block = c.u32().ok_or_else(short)?;
                        let max = c.u32().ok_or_else(short)?;
                        info.max_payload = max.min(proto::MAX_PAYLOAD_DEFAULT);
                    }
                    info::DESCRIPTION => {
                        info.description = Some(
                            String::from_utf8_lossy(c.bytes(c.remaining()).unwrap_or_default())
                                .into_owned(),
                        );
                    }
                    _ => {}
                }
            }
            rep::ACK => break,
            rep::ERR_UNSUP => {
                // An old server: fall back to NBD_OPT_EXPORT_NAME.
                send_option(write, opt::EXPORT_NAME, export.as_bytes()).await?;
                info.size = read.read_u64().await?;
                info.flags = read.read_u16().await?;
                if !no_zeroes {
                    let mut zeroes = [0u8; 124];
                    read.read_exact(&mut zeroes).await?;
                }
                got_export = true;
                break;
            }
            rep::ERR_UNKNOWN => {
                return Err(ClientError::UnknownExport {
                    name: export.to_string(),
                    message: String::from_utf8_lossy(&payload).into_owned(),
                });
            }
            other => return Err(refused(opt::GO, other, &payload)),
        }
    }
    if !got_export {
        return Err(ClientError::Protocol(
            "NBD_OPT_GO succeeded without NBD_INFO_EXPORT".into(),
        ));
    }
    // A max payload below the minimum block would make progress impossible.
    let align = info.min_block;
    info.max_payload = (info.max_payload / align * align).max(align);
    Ok(info)
}

/// Lists the exports of the server behind a unix socket (`NBD_OPT_LIST`),
/// then aborts the negotiation.
pub async fn list_exports_unix(path: impl AsRef<Path>) -> Result<Vec<ListedExport>, ClientError> {
    let stream = UnixStream::connect(path).await?;
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    greet(&mut r, &mut w).await?;
    send_option(&mut w, opt::LIST, &[]).await?;
    let mut exports = Vec::new();
    loop {
        let (kind, payload) = read_option_reply(&mut r, opt::LIST).await?;
        match kind {
            rep::SERVER => {
                let mut c = Cursor::new(&payload);
                let name = c.string32().ok_or_else(|| {
                    ClientError::Protocol("an NBD_REP_SERVER reply was malformed".into())
                })?;
                let description =
                    String::from_utf8_lossy(c.bytes(c.remaining()).unwrap_or_default())
                        .into_owned();
                exports.push(ListedExport { name, description });
            }
            rep::ACK => break,
            other => return Err(refused(opt::LIST, other, &payload)),
        }
    }
    send_option(&mut w, opt::ABORT, &[]).await?;
    // The server may or may not answer NBD_OPT_ABORT before closing.
    let _ = read_option_reply(&mut r, opt::ABORT).await;
    Ok(exports)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending_read(
        offset: u64,
        length: u32,
    ) -> (Pending, oneshot::Receiver<Result<Vec<u8>, ClientError>>) {
        let (tx, rx) = oneshot::channel();
        let pending = Pending {
            offset,
            length,
            error: None,
            kind: PendingKind::Read {
                buf: BytesMut::with_capacity(length as usize),
                covered: 0,
                reply: tx,
            },
        };
        (pending, rx)
    }

    fn data_chunk(offset: u64, data: &[u8]) -> Vec<u8> {
        let mut v = offset.to_be_bytes().to_vec();
        v.extend_from_slice(data);
        v
    }

    fn hole_chunk(offset: u64, len: u32) -> Vec<u8> {
        let mut v = offset.to_be_bytes().to_vec();
        v.extend_from_slice(&len.to_be_bytes());
        v
    }

    #[tokio::test]
    async fn read_chunks_reassemble_in_any_order() {
        let contexts = HashMap::new();
        let (mut p, rx) = pending_read(100, 12);
        // A hole at the end, then data at the start, then data in the middle.
        for (kind, payload) in [
            (reply::OFFSET_HOLE, hole_chunk(108, 4)),
            (reply::OFFSET_DATA, data_chunk(100, b"abcd")),
            (reply::OFFSET_DATA, data_chunk(104, b"efgh")),
        ] {
            let mut r: &[u8] = &payload;
            read_chunk(&mut r, &mut p, kind, payload.len() as u32, &contexts)
                .await
                .unwrap();
        }
        p.complete();
        assert_eq!(rx.await.unwrap().unwrap(), b"abcdefgh\0\0\0\0");
    }

    #[tokio::test]
    async fn read_chunks_outside_the_request_are_refused() {
        let contexts = HashMap::new();
        let (mut p, _rx) = pending_read(100, 8);
        let payload = data_chunk(104, b"too long");
        let mut r: &[u8] = &payload;
        let err = read_chunk(
            &mut r,
            &mut p,
            reply::OFFSET_DATA,
            payload.len() as u32,
            &contexts,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ClientError::Protocol(_)), "{err}");
    }

    #[tokio::test]
    async fn short_replies_and_error_chunks_fail_the_read() {
        let contexts = HashMap::new();
        let (mut p, rx) = pending_read(0, 8);
        let payload = data_chunk(0, b"abcd");
        let mut r: &[u8] = &payload;
        read_chunk(
            &mut r,
            &mut p,
            reply::OFFSET_DATA,
            payload.len() as u32,
            &contexts,
        )
        .await
        .unwrap();
        p.complete();
        assert!(matches!(rx.await.unwrap(), Err(ClientError::Protocol(_))));

        let (mut p, rx) = pending_read(0, 8);
        let mut payload = proto::errno::EIO.to_be_bytes().to_vec();
        payload.extend_from_slice(&4u16.to_be_bytes());
        payload.extend_from_slice(b"oops");
        payload.extend_from_slice(&2u64.to_be_bytes());
        let mut r: &[u8] = &payload;
        read_chunk(
            &mut r,
            &mut p,
            reply::ERROR_OFFSET,
            payload.len() as u32,
            &contexts,
        )
        .await
        .unwrap();
        p.complete();
        match rx.await.unwrap() {
            Err(ClientError::Request {
                errno,
                message,
                offset,
            }) => {
                assert_eq!(
                    (errno, message.as_str(), offset),
                    (proto::errno::EIO, "oops", Some(2))
                );
            }
            other => panic!("expected an EIO, got {other:?}"),
        }
    }
}
