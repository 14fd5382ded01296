//! A read-only NBD server over a unix socket, serving exports whose bytes come
//! from a caller's [`BlockSource`] (for instant recovery: a backup snapshot
//! served to QEMU).
//!
//! How the parts talk: [`Server::serve`] accepts connections and spawns one
//! task per connection. That task runs the fixed newstyle handshake
//! (`NBD_OPT_LIST`, `INFO`, `GO`, `EXPORT_NAME`, `STRUCTURED_REPLY`,
//! `LIST_META_CONTEXT`/`SET_META_CONTEXT` with `base:allocation`), then reads
//! requests in a loop. Reads and block status queries each run in their own
//! task (at most [`Server::with_max_in_flight`] per connection), and write
//! their whole reply under a lock on the connection's write half, so replies
//! of different requests never interleave mid-chunk and may complete out of
//! order. A failing source read is answered with `NBD_EIO` for that request
//! alone. Cancelling the shutdown token stops accepting, lets requests in
//! flight finish, then closes every connection.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::UnixListener;
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::proto::{
    self, Cursor, Extent, cmd, cmd_flag, errno, info as info_type, opt, rep, reply, state,
};

/// Where an export's bytes come from. Implemented by the caller (a repository
/// snapshot, a file, memory).
///
/// Calls arrive concurrently from many requests and connections.
pub trait BlockSource: Send + Sync + 'static {
    /// Size of the export in bytes; constant for the source's life.
    fn size(&self) -> u64;

    /// Returns exactly `length` bytes at `offset` (always inside the export).
    /// An error becomes `NBD_EIO` for the one request that asked.
    fn read_at(&self, offset: u64, length: usize)
    -> impl Future<Output = io::Result<Bytes>> + Send;

    /// Describes the allocation of the region starting at `offset` as
    /// extents with [`state::HOLE`] / [`state::ZERO`] flags, in order and
    /// starting at `offset`. It may cover less than `length` (at least one
    /// extent). It should be cheap (metadata only): reads consult it to send
    /// zero regions as holes. The default reports everything as data.
    fn extents(
        &self,
        offset: u64,
        length: u64,
    ) -> impl Future<Output = io::Result<Vec<Extent>>> + Send {
        async move {
            Ok(vec![Extent {
                offset,
                length,
                flags: 0,
            }])
        }
    }
}

/// What can stop the server as a whole (per-connection problems are only logged).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Accepting a connection failed.
    #[error("accepting an NBD connection failed")]
    Accept(#[source] io::Error),
    /// The listening socket could not be set up.
    #[error("cannot listen on {path}")]
    Listen {
        /// The socket path.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Why one connection ended early.
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("connection I/O failed")]
    Io(#[from] io::Error),
    #[error("the client broke the protocol: {0}")]
    Protocol(String),
}

/// One export: a name, an optional description and its source.
#[derive(Debug)]
struct Export<S> {
    /// Name clients select it by (the path part of an `nbd+unix:///NAME` URI).
    pub name: String,
    /// Shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: String,
    /// The data.
    pub source: Arc<S>,
}

/// Block size constraints announced to clients: any alignment, 4 KiB preferred, 32 MiB payloads.
const MIN_BLOCK: u32 = 1;
const PREFERRED_BLOCK: u32 = 4096;
const MAX_PAYLOAD: u32 = proto::MAX_PAYLOAD_DEFAULT;
/// Option payloads larger than this end the connection.
const MAX_OPTION_LEN: u32 = 64 * 1024;
/// The id of `base:allocation` on every connection.
const BASE_ALLOCATION_ID: u32 = 1;

/// A read-only NBD server for a fixed set of exports.
#[derive(Debug)]
pub struct Server<S> {
    inner: Arc<ServerInner<S>>,
}

impl<S> Clone for Server<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

#[derive(Debug)]
struct ServerInner<S> {
    exports: BTreeMap<String, Export<S>>,
    max_in_flight: usize,
}

impl<S: BlockSource> Default for Server<S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S: BlockSource> Server<S> {
    /// A server with no exports and 64 requests in flight per connection.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(ServerInner {
                exports: BTreeMap::new(),
                max_in_flight: 64,
            }),
        }
    }

    fn inner_mut(&mut self) -> &mut ServerInner<S> {
        Arc::get_mut(&mut self.inner).expect("configure the server before serving it")
    }

    /// Adds (or replaces) an export. Configure before serving.
    pub fn with_export(
        mut self,
        name: impl Into<String>,
        description: impl Into<String>,
        source: Arc<S>,
    ) -> Self {
        let name = name.into();
        self.inner_mut().exports.insert(
            name.clone(),
            Export {
                name,
                description: description.into(),
                source,
            },
        );
        self
    }

    /// Sets how many reads and block status queries one connection may have running at once.
    pub fn with_max_in_flight(mut self, n: usize) -> Self {
        self.inner_mut().max_in_flight = n.max(1);
        self
    }

    /// Binds a unix socket at `path` (replacing a stale socket file) and serves
    /// until `shutdown` is cancelled; see [`Server::serve`].
    pub async fn serve_unix_path(
        &self,
        path: impl AsRef<Path>,
        shutdown: CancellationToken,
    ) -> Result<(), ServerError> {
        let path = path.as_ref();
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(|source| ServerError::Listen {
            path: path.display().to_string(),
            source,
        })?;
        let result = self.serve(listener, shutdown).await;
        let _ = std::fs::remove_file(path);
        result
    }

    /// Accepts clients until `shutdown` is cancelled, then waits for every
    /// connection to finish its requests in flight and close.
    pub async fn serve(
        &self,
        listener: UnixListener,
        shutdown: CancellationToken,
    ) -> Result<(), ServerError> {
        let mut connections = JoinSet::new();
        // Connections stop with the caller's token, or when accepting fails.
        let stop = shutdown.child_token();
        let result = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let (r, w) = stream.into_split();
                        let server = self.clone();
                        let token = stop.clone();
                        connections.spawn(async move { server.serve_connection(r, w, token).await });
                    }
                    Err(e) => break Err(ServerError::Accept(e)),
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        };
        if result.is_err() {
            stop.cancel();
        }
        while connections.join_next().await.is_some() {}
        result
    }

    /// Serves one already accepted connection, given as its two halves, until
    /// the client disconnects or `shutdown` is cancelled.
    pub async fn serve_connection<R, W>(&self, read: R, write: W, shutdown: CancellationToken)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut read = BufReader::with_capacity(64 * 1024, read);
        let mut write = BufWriter::with_capacity(64 * 1024, write);
        let session = tokio::select! {
            _ = shutdown.cancelled() => return,
            s = negotiate(&self.inner, &mut read, &mut write) => s,
        };
        let session = match session {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(e) => {
                debug!(error = %e, "NBD handshake ended");
                return;
            }
        };
        info!(export = %session.name, structured = session.structured, "NBD client connected");
        if let Err(e) = transmit(&self.inner, session, read, write, shutdown).await {
            warn!(error = %e, "NBD connection ended with an error");
        }
    }
}

/// What the handshake settled for a connection.
struct Session<S> {
    name: String,
    source: Arc<S>,
    structured: bool,
    base_allocation: bool,
}

fn transmission_flags(structured: bool) -> u16 {
    use proto::transmission::*;
    let mut flags = HAS_FLAGS | READ_ONLY | CAN_MULTI_CONN;
    if structured {
        flags |= SEND_DF;
    }
    flags
}

async fn option_reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    option: u32,
    kind: u32,
    data: &[u8],
) -> io::Result<()> {
    w.write_all(&proto::encode_option_reply(option, kind, data.len() as u32))
        .await?;
    w.write_all(data).await
}

/// Parses an export name followed by u16 information requests (INFO/GO).
fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let mut c = Cursor::new(data);
    let name = c.string32()?;
    let n = c.u16()?;
    let requests = (0..n).map(|_| c.u16()).collect::<Option<Vec<_>>>()?;
    (c.remaining() == 0).then_some((name, requests))
}

/// Parses an export name followed by u32-length-prefixed queries (meta contexts).
fn parse_meta_request(data: &[u8]) -> Option<(String, Vec<String>)> {
    let mut c = Cursor::new(data);
    let name = c.string32()?;
    let n = c.u32()?;
    let queries = (0..n).map(|_| c.string32()).collect::<Option<Vec<_>>>()?;
    (c.remaining() == 0).then_some((name, queries))
}

impl<S> ServerInner<S> {
    /// The export called `name`; the empty name (the client's "default
    /// export") selects the only export when there is exactly one.
    fn lookup(&self, name: &str) -> Option<&Export<S>> {
        match self.exports.get(name) {
            Some(e) => Some(e),
            None if name.is_empty() && self.exports.len() == 1 => self.exports.values().next(),
            None => None,
        }
    }
}

/// Runs option haggling; `Ok(None)` when the client aborted.
async fn negotiate<S: BlockSource, R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    server: &ServerInner<S>,
    r: &mut R,
    w: &mut W,
) -> Result<Option<Session<S>>, ConnectionError> {
    w.write_all(&proto::NBD_MAGIC.to_be_bytes()).await?;
    w.write_all(&proto::IHAVEOPT.to_be_bytes()).await?;
    w.write_all(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes())
        .await?;
    w.flush().await?;
    let client_flags = r.read_u32().await?;
    if client_flags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
        return Err(ConnectionError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let no_zeroes = client_flags & proto::FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    // The export a SET_META_CONTEXT was for, and whether base:allocation was selected.
    let mut meta: Option<(String, bool)> = None;
    loop {
        let magic = r.read_u64().await?;
        if magic != proto::IHAVEOPT {
            return Err(ConnectionError::Protocol(format!(
                "bad option magic {magic:#x}"
            )));
        }
        let option = r.read_u32().await?;
        let len = r.read_u32().await?;
        if len > MAX_OPTION_LEN {
            return Err(ConnectionError::Protocol(format!(
                "an option of {len} bytes is too large"
            )));
        }
        let mut data = vec![0; len as usize];
        r.read_exact(&mut data).await?;
        match option {
            opt::EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(export) = server.lookup(&name) else {
                    // No way to report an error here: a hard disconnect.
                    return Err(ConnectionError::Protocol(format!(
                        "NBD_OPT_EXPORT_NAME for unknown export {name:?}"
                    )));
                };
                w.write_all(&export.source.size().to_be_bytes()).await?;
                w.write_all(&transmission_flags(structured).to_be_bytes())
                    .await?;
                if !no_zeroes {
                    w.write_all(&[0u8; 124]).await?;
                }
                w.flush().await?;
                let base_allocation = matches!(&meta, Some((n, true)) if *n == name);
                return Ok(Some(Session {
                    name: export.name.clone(),
                    source: export.source.clone(),
                    structured,
                    base_allocation,
                }));
            }
            opt::ABORT => {
                option_reply(w, option, rep::ACK, &[]).await?;
                w.flush().await?;
                return Ok(None);
            }
            opt::LIST => {
                if len != 0 {
                    option_reply(w, option, rep::ERR_INVALID, b"NBD_OPT_LIST takes no data")
                        .await?;
                } else {
                    for export in server.exports.values() {
                        let mut payload = Vec::new();
                        payload.extend_from_slice(&(export.name.len() as u32).to_be_bytes());
                        payload.extend_from_slice(export.name.as_bytes());
                        payload.extend_from_slice(export.description.as_bytes());
                        option_reply(w, option, rep::SERVER, &payload).await?;
                    }
                    option_reply(w, option, rep::ACK, &[]).await?;
                }
            }
            opt::INFO | opt::GO => {
                let Some((name, requests)) = parse_info_request(&data) else {
                    option_reply(w, option, rep::ERR_INVALID, b"malformed request").await?;
                    w.flush().await?;
                    continue;
                };
                let Some(export) = server.lookup(&name) else {
                    let msg = format!("no export named {name:?}");
                    option_reply(w, option, rep::ERR_UNKNOWN, msg.as_bytes()).await?;
                    w.flush().await?;
                    continue;
                };
                let mut payload = Vec::with_capacity(12);
                payload.extend_from_slice(&info_type::EXPORT.to_be_bytes());
                payload.extend_from_slice(&export.source.size().to_be_bytes());
                payload.extend_from_slice(&transmission_flags(structured).to_be_bytes());
                option_reply(w, option, rep::INFO, &payload).await?;
                let mut payload = Vec::with_capacity(14);
                payload.extend_from_slice(&info_type::BLOCK_SIZE.to_be_bytes());
                payload.extend_from_slice(&MIN_BLOCK.to_be_bytes());
                payload.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
                payload.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                option_reply(w, option, rep::INFO, &payload).await?;
                if requests.contains(&info_type::NAME) || name != export.name {
                    let mut payload = info_type::NAME.to_be_bytes().to_vec();
                    payload.extend_from_slice(export.name.as_bytes());
                    option_reply(w, option, rep::INFO, &payload).await?;
                }
                if requests.contains(&info_type::DESCRIPTION) && !export.description.is_empty() {
                    let mut payload = info_type::DESCRIPTION.to_be_bytes().to_vec();
                    payload.extend_from_slice(export.description.as_bytes());
                    option_reply(w, option, rep::INFO, &payload).await?;
                }
                option_reply(w, option, rep::ACK, &[]).await?;
                w.flush().await?;
                if option == opt::GO {
                    let base_allocation = matches!(&meta, Some((n, true)) if *n == name);
                    return Ok(Some(Session {
                        name: export.name.clone(),
                        source: export.source.clone(),
                        structured,
                        base_allocation,
                    }));
                }
            }
            opt::STRUCTURED_REPLY => {
                if len != 0 {
                    option_reply(
                        w,
                        option,
                        rep::ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY takes no data",
                    )
                    .await?;
                } else {
                    structured = true;
                    option_reply(w, option, rep::ACK, &[]).await?;
                }
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                if option == opt::SET_META_CONTEXT {
                    meta = None;
                }
                if !structured {
                    option_reply(
                        w,
                        option,
                        rep::ERR_INVALID,
                        b"negotiate structured replies first",
                    )
                    .await?;
                    w.flush().await?;
                    continue;
                }
                let Some((name, queries)) = parse_meta_request(&data) else {
                    option_reply(w, option, rep::ERR_INVALID, b"malformed request").await?;
                    w.flush().await?;
                    continue;
                };
                if server.lookup(&name).is_none() {
                    let msg = format!("no export named {name:?}");
                    option_reply(w, option, rep::ERR_UNKNOWN, msg.as_bytes()).await?;
                    w.flush().await?;
                    continue;
                }
                let selects = if option == opt::LIST_META_CONTEXT {
                    queries.is_empty()
                        || queries
                            .iter()
                            .any(|q| q == "base:" || q == proto::BASE_ALLOCATION)
                } else {
                    queries.iter().any(|q| q == proto::BASE_ALLOCATION)
                };
                if selects {
                    let mut payload = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                    payload.extend_from_slice(proto::BASE_ALLOCATION.as_bytes());
                    option_reply(w, option, rep::META_CONTEXT, &payload).await?;
                }
                if option == opt::SET_META_CONTEXT {
                    meta = Some((name, selects));
                }
                option_reply(w, option, rep::ACK, &[]).await?;
            }
            opt::STARTTLS => {
                option_reply(
                    w,
                    option,
                    rep::ERR_POLICY,
                    b"this server does not offer TLS",
                )
                .await?;
            }
            _ => {
                option_reply(w, option, rep::ERR_UNSUP, &[]).await?;
            }
        }
        w.flush().await?;
    }
}

type SharedWriter<W> = Arc<Mutex<BufWriter<W>>>;

/// The transmission phase of one connection.
async fn transmit<S: BlockSource, R: AsyncRead + Unpin, W: AsyncWrite + Unpin + Send + 'static>(
    server: &ServerInner<S>,
    session: Session<S>,
    mut r: BufReader<R>,
    w: BufWriter<W>,
    shutdown: CancellationToken,
) -> Result<(), ConnectionError> {
    let writer: SharedWriter<W> = Arc::new(Mutex::new(w));
    let session = Arc::new(session);
    let slots = Arc::new(Semaphore::new(server.max_in_flight));
    let mut tasks = JoinSet::new();
    let result = loop {
        let mut header = [0u8; proto::REQUEST_HEADER_LEN];
        let got = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            got = r.read_exact(&mut header) => got,
        };
        match got {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e.into()),
        }
        let Some(req) = proto::decode_request(&header) else {
            break Err(ConnectionError::Protocol("bad request magic".into()));
        };
        while tasks.try_join_next().is_some() {}
        let structured = session.structured;
        match req.kind {
            cmd::DISC => break Ok(()),
            cmd::WRITE => {
                if req.length > MAX_PAYLOAD {
                    break Err(ConnectionError::Protocol(format!(
                        "a write of {} bytes is too large",
                        req.length
                    )));
                }
                tokio::io::copy(
                    &mut (&mut r).take(u64::from(req.length)),
                    &mut tokio::io::sink(),
                )
                .await?;
                send_error(
                    &writer,
                    structured,
                    req.cookie,
                    errno::EPERM,
                    "the export is read-only",
                )
                .await?;
            }
            cmd::TRIM | cmd::WRITE_ZEROES => {
                send_error(
                    &writer,
                    structured,
                    req.cookie,
                    errno::EPERM,
                    "the export is read-only",
                )
                .await?;
            }
            cmd::FLUSH | cmd::CACHE => send_ok(&writer, structured, req.cookie).await?,
            cmd::READ | cmd::BLOCK_STATUS => {
                let permit = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break Ok(()),
                    p = slots.clone().acquire_owned() => p.expect("semaphore never closes"),
                };
                let session = session.clone();
                let writer = writer.clone();
                tasks.spawn(async move {
                    let result = if req.kind == cmd::READ {
                        handle_read(&session, &writer, req).await
                    } else {
                        handle_block_status(&session, &writer, req).await
                    };
                    drop(permit);
                    if let Err(e) = result {
                        debug!(error = %e, "writing an NBD reply failed");
                    }
                });
            }
            other => {
                let msg = format!("unknown command {other}");
                send_error(&writer, structured, req.cookie, errno::EINVAL, &msg).await?;
            }
        }
    };
    // Requests in flight finish before the connection closes.
    while tasks.join_next().await.is_some() {}
    let mut w = writer.lock().await;
    let _ = w.flush().await;
    let _ = w.shutdown().await;
    debug!(export = %session.name, "NBD client disconnected");
    result
}

async fn send_ok<W: AsyncWrite + Unpin>(
    writer: &SharedWriter<W>,
    structured: bool,
    cookie: u64,
) -> io::Result<()> {
    let mut w = writer.lock().await;
    if structured {
        w.write_all(&proto::encode_chunk_header(
            reply::FLAG_DONE,
            reply::NONE,
            cookie,
            0,
        ))
        .await?;
    } else {
        w.write_all(&proto::encode_simple_reply(0, cookie)).await?;
    }
    w.flush().await
}

async fn send_error<W: AsyncWrite + Unpin>(
    writer: &SharedWriter<W>,
    structured: bool,
    cookie: u64,
    error: u32,
    message: &str,
) -> io::Result<()> {
    let mut w = writer.lock().await;
    if structured {
        let msg = truncate_utf8(message, 4096);
        let len = 6 + msg.len() as u32;
        w.write_all(&proto::encode_chunk_header(
            reply::FLAG_DONE,
            reply::ERROR,
            cookie,
            len,
        ))
        .await?;
        w.write_all(&error.to_be_bytes()).await?;
        w.write_all(&(msg.len() as u16).to_be_bytes()).await?;
        w.write_all(msg.as_bytes()).await?;
    } else {
        w.write_all(&proto::encode_simple_reply(error, cookie))
            .await?;
    }
    w.flush().await
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Checks a request against the export's bounds; the error to send otherwise.
fn check_bounds(size: u64, req: &proto::RequestHeader) -> Option<(u32, String)> {
    if req
        .offset
        .checked_add(u64::from(req.length))
        .is_none_or(|end| end > size)
    {
        return Some((
            errno::EINVAL,
            format!(
                "{} bytes at offset {} reach past the end of the export ({size} bytes)",
                req.length, req.offset
            ),
        ));
    }
    None
}

/// Turns a source's extents into ordered, non-overlapping extents inside
/// `[offset, offset+length)`, starting at `offset`; gaps count as data.
fn normalize_extents(offset: u64, length: u64, extents: &[Extent], max: usize) -> Vec<Extent> {
    let end = offset + length;
    let mut out: Vec<Extent> = Vec::new();
    let mut at = offset;
    for e in extents {
        if at >= end || out.len() >= max {
            break;
        }
        if e.end() <= at {
            continue;
        }
        if e.offset > at {
            proto::push_merged(
                &mut out,
                Extent {
                    offset: at,
                    length: e.offset.min(end) - at,
                    flags: 0,
                },
            );
            at = e.offset.min(end);
            if at >= end {
                break;
            }
        }
        let stop = e.end().min(end);
        proto::push_merged(
            &mut out,
            Extent {
                offset: at,
                length: stop - at,
                flags: e.flags & (state::HOLE | state::ZERO),
            },
        );
        at = stop;
    }
    if out.is_empty() {
        out.push(Extent {
            offset,
            length,
            flags: 0,
        });
    }
    out
}

async fn handle_read<S: BlockSource, W: AsyncWrite + Unpin>(
    session: &Session<S>,
    writer: &SharedWriter<W>,
    req: proto::RequestHeader,
) -> io::Result<()> {
    let structured = session.structured;
    if let Some((e, msg)) = check_bounds(session.source.size(), &req) {
        return send_error(writer, structured, req.cookie, e, &msg).await;
    }
    if req.length > MAX_PAYLOAD {
        let msg = format!("reads are limited to {MAX_PAYLOAD} bytes");
        let e = if structured {
            errno::EOVERFLOW
        } else {
            errno::EINVAL
        };
        return send_error(writer, structured, req.cookie, e, &msg).await;
    }
    if req.length == 0 {
        return send_ok(writer, structured, req.cookie).await;
    }
    let length = u64::from(req.length);
    // Pieces to send: zero regions as holes when structured replies allow fragments.
    let pieces = if structured && req.flags & cmd_flag::DF == 0 {
        match session.source.extents(req.offset, length).await {
            Ok(extents) => normalize_extents(req.offset, length, &extents, usize::MAX),
            Err(e) => {
                debug!(error = %e, "allocation lookup failed; reading as data");
                vec![Extent {
                    offset: req.offset,
                    length,
                    flags: 0,
                }]
            }
        }
    } else {
        vec![Extent {
            offset: req.offset,
            length,
            flags: 0,
        }]
    };
    // The source may cover less than asked; the rest is data.
    let covered_end = pieces.last().map_or(req.offset, Extent::end);
    let mut pieces = pieces;
    if covered_end < req.offset + length {
        pieces.push(Extent {
            offset: covered_end,
            length: req.offset + length - covered_end,
            flags: 0,
        });
    }
    let mut data = Vec::with_capacity(pieces.len());
    for p in &pieces {
        if p.flags & state::ZERO != 0 {
            data.push(None);
            continue;
        }
        match session.source.read_at(p.offset, p.length as usize).await {
            Ok(bytes) if bytes.len() as u64 == p.length => data.push(Some(bytes)),
            Ok(bytes) => {
                let msg = format!(
                    "the source returned {} bytes instead of {} at offset {}",
                    bytes.len(),
                    p.length,
                    p.offset
                );
                return send_read_error(writer, structured, req.cookie, p.offset, &msg).await;
            }
            Err(e) => {
                warn!(export = %session.name, offset = p.offset, length = p.length, error = %e, "NBD source read failed");
                let msg = format!(
                    "reading {} bytes at offset {} failed: {e}",
                    p.length, p.offset
                );
                return send_read_error(writer, structured, req.cookie, p.offset, &msg).await;
            }
        }
    }
    let mut w = writer.lock().await;
    if !structured {
        w.write_all(&proto::encode_simple_reply(0, req.cookie))
            .await?;
        for bytes in data.iter().flatten() {
            w.write_all(bytes).await?;
        }
        return w.flush().await;
    }
    let last = pieces.len() - 1;
    for (i, (p, bytes)) in pieces.iter().zip(&data).enumerate() {
        let flags = if i == last { reply::FLAG_DONE } else { 0 };
        match bytes {
            Some(bytes) => {
                let header = proto::encode_chunk_header(
                    flags,
                    reply::OFFSET_DATA,
                    req.cookie,
                    8 + bytes.len() as u32,
                );
                w.write_all(&header).await?;
                w.write_all(&p.offset.to_be_bytes()).await?;
                w.write_all(bytes).await?;
            }
            None => {
                let header = proto::encode_chunk_header(flags, reply::OFFSET_HOLE, req.cookie, 12);
                w.write_all(&header).await?;
                w.write_all(&p.offset.to_be_bytes()).await?;
                w.write_all(&(p.length as u32).to_be_bytes()).await?;
            }
        }
    }
    w.flush().await
}

async fn send_read_error<W: AsyncWrite + Unpin>(
    writer: &SharedWriter<W>,
    structured: bool,
    cookie: u64,
    offset: u64,
    message: &str,
) -> io::Result<()> {
    if !structured {
        return send_error(writer, false, cookie, errno::EIO, message).await;
    }
    let msg = truncate_utf8(message, 4096);
    let mut w = writer.lock().await;
    let len = 6 + msg.len() as u32 + 8;
    w.write_all(&proto::encode_chunk_header(
        reply::FLAG_DONE,
        reply::ERROR_OFFSET,
        cookie,
        len,
    ))
    .await?;
    w.write_all(&errno::EIO.to_be_bytes()).await?;
    w.write_all(&(msg.len() as u16).to_be_bytes()).await?;
    w.write_all(msg.as_bytes()).await?;
    w.write_all(&offset.to_be_bytes()).await?;
    w.flush().await
}

async fn handle_block_status<S: BlockSource, W: AsyncWrite + Unpin>(
    session: &Session<S>,
    writer: &SharedWriter<W>,
    req: proto::RequestHeader,
) -> io::Result<()> {
    if !session.structured || !session.base_allocation {
        return send_error(
            writer,
            session.structured,
            req.cookie,
            errno::EINVAL,
            "no metadata context was selected",
        )
        .await;
    }
    if req.length == 0 {
        return send_error(
            writer,
            true,
            req.cookie,
            errno::EINVAL,
            "block status of zero bytes",
        )
        .await;
    }
    if let Some((e, msg)) = check_bounds(session.source.size(), &req) {
        return send_error(writer, true, req.cookie, e, &msg).await;
    }
    let length = u64::from(req.length);
    let extents = match session.source.extents(req.offset, length).await {
        Ok(e) => e,
        Err(e) => {
            let msg = format!("looking up allocation at offset {} failed: {e}", req.offset);
            return send_error(writer, true, req.cookie, errno::EIO, &msg).await;
        }
    };
    let max = if req.flags & cmd_flag::REQ_ONE != 0 {
        1
    } else {
        1 << 20
    };
    let extents = normalize_extents(req.offset, length, &extents, max);
    let mut payload = Vec::with_capacity(4 + 8 * extents.len());
    payload.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
    for e in &extents {
        payload.extend_from_slice(&(e.length as u32).to_be_bytes());
        payload.extend_from_slice(&e.flags.to_be_bytes());
    }
    let mut w = writer.lock().await;
    w.write_all(&proto::encode_chunk_header(
        reply::FLAG_DONE,
        reply::BLOCK_STATUS,
        req.cookie,
        payload.len() as u32,
    ))
    .await?;
    w.write_all(&payload).await?;
    w.flush().await
}

/// A [`BlockSource`] over a raw image file: positional reads on the blocking
/// pool, and holes from `SEEK_DATA`/`SEEK_HOLE` reported as
/// [`state::HOLE`]` | `[`state::ZERO`].
#[derive(Debug, Clone)]
pub struct FileSource {
    file: Arc<std::fs::File>,
    size: u64,
}

impl FileSource {
    /// Opens `path` read-only.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let file = std::fs::File::open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            file: Arc::new(file),
            size,
        })
    }

    fn seek(&self, offset: u64, whence: nix::unistd::Whence) -> io::Result<Option<u64>> {
        match nix::unistd::lseek(&*self.file, offset as i64, whence) {
            Ok(pos) => Ok(Some(pos as u64)),
            Err(nix::errno::Errno::ENXIO) => Ok(None),
            Err(e) => Err(io::Error::from(e)),
        }
    }
}

impl BlockSource for FileSource {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read_at(&self, offset: u64, length: usize) -> io::Result<Bytes> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0; length];
            file.read_exact_at(&mut buf, offset)?;
            Ok(Bytes::from(buf))
        })
        .await
        .map_err(io::Error::other)?
    }

    async fn extents(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        let end = (offset + length).min(self.size);
        let mut out = Vec::new();
        let mut at = offset;
        // A handful of lseek calls per query; the kernel answers from metadata.
        while at < end && out.len() < 1024 {
            let data = self
                .seek(at, nix::unistd::Whence::SeekData)?
                .unwrap_or(end)
                .min(end);
            if data > at {
                out.push(Extent {
                    offset: at,
                    length: data - at,
                    flags: state::HOLE | state::ZERO,
                });
                at = data;
                continue;
            }
            let hole = self
                .seek(at, nix::unistd::Whence::SeekHole)?
                .unwrap_or(end)
                .min(end);
            out.push(Extent {
                offset: at,
                length: hole.max(at + 1) - at,
                flags: 0,
            });
            at = hole.max(at + 1);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_are_clipped_and_gaps_filled() {
        let src = [
            Extent {
                offset: 0,
                length: 100,
                flags: 3,
            },
            Extent {
                offset: 150,
                length: 50,
                flags: 3,
            },
            Extent {
                offset: 200,
                length: 1000,
                flags: 0,
            },
        ];
        let got = normalize_extents(50, 200, &src, usize::MAX);
        assert_eq!(
            got,
            vec![
                Extent {
                    offset: 50,
                    length: 50,
                    flags: 3
                },
                Extent {
                    offset: 100,
                    length: 50,
                    flags: 0
                },
                Extent {
                    offset: 150,
                    length: 50,
                    flags: 3
                },
                Extent {
                    offset: 200,
                    length: 50,
                    flags: 0
                },
            ]
        );
        assert_eq!(
            normalize_extents(50, 200, &src, 1),
            vec![Extent {
                offset: 50,
                length: 50,
                flags: 3
            }]
        );
        assert_eq!(
            normalize_extents(5, 10, &[], 8),
            vec![Extent {
                offset: 5,
                length: 10,
                flags: 0
            }]
        );
    }

    #[test]
    fn info_and_meta_requests_parse() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"exp");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&3u16.to_be_bytes());
        assert_eq!(parse_info_request(&d), Some(("exp".into(), vec![3])));
        d.push(0);
        assert_eq!(parse_info_request(&d), None);
        let mut m = Vec::new();
        m.extend_from_slice(&0u32.to_be_bytes());
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&15u32.to_be_bytes());
        m.extend_from_slice(b"base:allocation");
        assert_eq!(
            parse_meta_request(&m),
            Some((String::new(), vec!["base:allocation".into()]))
        );
    }
}
