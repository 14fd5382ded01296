//! Wire constants and small pure codecs of the NBD protocol
//! (NetworkBlockDevice/nbd `doc/proto.md`), shared by the client and the server.
//!
//! Only the baseline protocol plus structured replies and metadata contexts
//! is covered; the experimental extended headers are refused by the server
//! and never asked for by the client.

/// `NBDMAGIC`, the first eight bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, the newstyle magic; also prefixes every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply in fixed newstyle negotiation.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client does not want the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags of an export (`NBD_FLAG_*`), as sent in `NBD_INFO_EXPORT`.
pub mod transmission {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_CMD_FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_FUA` is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// The export behaves like a rotational medium.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_CMD_TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_CMD_WRITE_ZEROES` is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_CMD_FLAG_DF` is supported on reads.
    pub const SEND_DF: u16 = 1 << 7;
    /// Several connections to the export see one consistent state.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_CMD_CACHE` is supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_CMD_FLAG_FAST_ZERO` is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option types (`NBD_OPT_*`).
pub mod opt {
    /// Select an export and enter transmission (no error reporting).
    pub const EXPORT_NAME: u32 = 1;
    /// Abort the negotiation.
    pub const ABORT: u32 = 2;
    /// List the exports.
    pub const LIST: u32 = 3;
    /// Start TLS.
    pub const STARTTLS: u32 = 5;
    /// Ask about an export without selecting it.
    pub const INFO: u32 = 6;
    /// Select an export and enter transmission.
    pub const GO: u32 = 7;
    /// Negotiate structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// Negotiate extended headers (experimental; refused here).
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types (`NBD_REP_*`); errors have bit 31 set.
pub mod rep {
    /// The option succeeded or its list ended.
    pub const ACK: u32 = 1;
    /// One export of an `NBD_OPT_LIST` reply.
    pub const SERVER: u32 = 2;
    /// One information item of an `NBD_OPT_INFO`/`NBD_OPT_GO` reply.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// Bit set on every error reply.
    pub const ERROR_BIT: u32 = 1 << 31;
    /// The option is unknown to the server.
    pub const ERR_UNSUP: u32 = ERROR_BIT | 1;
    /// Server policy forbids the option.
    pub const ERR_POLICY: u32 = ERROR_BIT | 2;
    /// The option is syntactically or semantically invalid.
    pub const ERR_INVALID: u32 = ERROR_BIT | 3;
    /// The platform lacks support for the option.
    pub const ERR_PLATFORM: u32 = ERROR_BIT | 4;
    /// TLS is required first.
    pub const ERR_TLS_REQD: u32 = ERROR_BIT | 5;
    /// The export does not exist.
    pub const ERR_UNKNOWN: u32 = ERROR_BIT | 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERROR_BIT | 7;
    /// The client must ask for block size constraints.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERROR_BIT | 8;
    /// The request or reply is too large.
    pub const ERR_TOO_BIG: u32 = ERROR_BIT | 9;
}

/// Information types of `NBD_REP_INFO` (`NBD_INFO_*`).
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Canonical export name.
    pub const NAME: u16 = 1;
    /// Human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Request types (`NBD_CMD_*`).
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write.
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Trim.
    pub const TRIM: u16 = 4;
    /// Cache hint.
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags (`NBD_CMD_FLAG_*`).
pub mod cmd_flag {
    /// Force unit access.
    pub const FUA: u16 = 1 << 0;
    /// Do not punch holes (write zeroes).
    pub const NO_HOLE: u16 = 1 << 1;
    /// Do not fragment the read reply.
    pub const DF: u16 = 1 << 2;
    /// One extent per context (block status).
    pub const REQ_ONE: u16 = 1 << 3;
    /// Fail fast if zeroing is slow.
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk types (`NBD_REPLY_TYPE_*`) and the done flag.
pub mod reply {
    /// Flag on the last chunk of a reply.
    pub const FLAG_DONE: u16 = 1 << 0;
    /// Empty final chunk.
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// Zeroes at an offset.
    pub const OFFSET_HOLE: u16 = 2;
    /// Extents of one metadata context.
    pub const BLOCK_STATUS: u16 = 5;
    /// Bit set on every error chunk type.
    pub const ERROR_BIT: u16 = 1 << 15;
    /// An error for the whole request.
    pub const ERROR: u16 = ERROR_BIT | 1;
    /// An error at an offset.
    pub const ERROR_OFFSET: u16 = ERROR_BIT | 2;
}

/// Flags of the `base:allocation` context.
pub mod state {
    /// The extent is not allocated.
    pub const HOLE: u32 = 1 << 0;
    /// The extent reads as zeroes.
    pub const ZERO: u32 = 1 << 1;
    /// `qemu:dirty-bitmap:<name>`: the extent is dirty.
    pub const DIRTY: u32 = 1 << 0;
}

/// The `base:allocation` metadata context name.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// The metadata context name QEMU uses to expose the dirty bitmap `bitmap`.
pub fn qemu_dirty_bitmap_context(bitmap: &str) -> String {
    format!("qemu:dirty-bitmap:{bitmap}")
}

/// The payload limit every NBD implementation accepts (32 MiB); reads are split to it.
pub const MAX_PAYLOAD_DEFAULT: u32 = 32 * 1024 * 1024;

/// Length of a transmission request header.
pub const REQUEST_HEADER_LEN: usize = 28;

/// Error numbers carried in replies (`NBD_E*`).
pub mod errno {
    /// Operation not permitted.
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Cannot allocate memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left on device.
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Operation not supported.
    pub const ENOTSUP: u32 = 95;
    /// Server is shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// A readable name for an NBD error number.
pub fn errno_name(errno: u32) -> &'static str {
    match errno {
        errno::EPERM => "EPERM (operation not permitted)",
        errno::EIO => "EIO (input/output error)",
        errno::ENOMEM => "ENOMEM (cannot allocate memory)",
        errno::EINVAL => "EINVAL (invalid argument)",
        errno::ENOSPC => "ENOSPC (no space left on device)",
        errno::EOVERFLOW => "EOVERFLOW (value too large)",
        errno::ENOTSUP => "ENOTSUP (operation not supported)",
        errno::ESHUTDOWN => "ESHUTDOWN (server is shutting down)",
        _ => "an unknown error",
    }
}

/// A readable name for an option.
pub fn option_name(option: u32) -> String {
    match option {
        opt::EXPORT_NAME => "NBD_OPT_EXPORT_NAME".into(),
        opt::ABORT => "NBD_OPT_ABORT".into(),
        opt::LIST => "NBD_OPT_LIST".into(),
        opt::STARTTLS => "NBD_OPT_STARTTLS".into(),
        opt::INFO => "NBD_OPT_INFO".into(),
        opt::GO => "NBD_OPT_GO".into(),
        opt::STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY".into(),
        opt::LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT".into(),
        opt::SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT".into(),
        opt::EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS".into(),
        other => format!("option {other}"),
    }
}

/// A readable name for an option reply type.
pub fn reply_type_name(reply: u32) -> String {
    match reply {
        rep::ACK => "NBD_REP_ACK".into(),
        rep::SERVER => "NBD_REP_SERVER".into(),
        rep::INFO => "NBD_REP_INFO".into(),
        rep::META_CONTEXT => "NBD_REP_META_CONTEXT".into(),
        rep::ERR_UNSUP => "NBD_REP_ERR_UNSUP".into(),
        rep::ERR_POLICY => "NBD_REP_ERR_POLICY".into(),
        rep::ERR_INVALID => "NBD_REP_ERR_INVALID".into(),
        rep::ERR_PLATFORM => "NBD_REP_ERR_PLATFORM".into(),
        rep::ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD".into(),
        rep::ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN".into(),
        rep::ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN".into(),
        rep::ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD".into(),
        rep::ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG".into(),
        other => format!("reply type {other:#x}"),
    }
}

/// One extent of a metadata context: `length` bytes from `offset` share `flags`.
///
/// Offsets are absolute within the export, so a list of extents reads on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First byte of the extent.
    pub offset: u64,
    /// Length in bytes (never zero).
    pub length: u64,
    /// Context-defined flags (for `base:allocation`: [`state::HOLE`], [`state::ZERO`];
    /// for `qemu:dirty-bitmap:*`: [`state::DIRTY`]).
    pub flags: u32,
}

impl Extent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// Appends `extent` to `list`, merging it into the last one when adjacent with equal flags.
pub fn push_merged(list: &mut Vec<Extent>, extent: Extent) {
    if extent.length == 0 {
        return;
    }
    if let Some(last) = list.last_mut()
        && last.end() == extent.offset
        && last.flags == extent.flags
    {
        last.length += extent.length;
        return;
    }
    list.push(extent);
}

/// Encodes a transmission request header.
pub fn encode_request(
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    length: u32,
) -> [u8; REQUEST_HEADER_LEN] {
    let mut b = [0u8; REQUEST_HEADER_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&length.to_be_bytes());
    b
}

/// A decoded transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// Opaque cookie echoed in replies.
    pub cookie: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Length of the request.
    pub length: u32,
}

/// Decodes a transmission request header; `None` when the magic is wrong.
pub fn decode_request(b: &[u8; REQUEST_HEADER_LEN]) -> Option<RequestHeader> {
    if u32::from_be_bytes(b[0..4].try_into().ok()?) != REQUEST_MAGIC {
        return None;
    }
    Some(RequestHeader {
        flags: u16::from_be_bytes([b[4], b[5]]),
        kind: u16::from_be_bytes([b[6], b[7]]),
        cookie: u64::from_be_bytes(b[8..16].try_into().ok()?),
        offset: u64::from_be_bytes(b[16..24].try_into().ok()?),
        length: u32::from_be_bytes(b[24..28].try_into().ok()?),
    })
}

/// Encodes a structured reply chunk header (the payload follows).
pub fn encode_chunk_header(flags: u16, kind: u16, cookie: u64, length: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// Encodes a simple reply header.
pub fn encode_simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Encodes an option reply header (the payload follows).
pub fn encode_option_reply(option: u32, reply: u32, length: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&reply.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// A cursor over a big-endian payload that reports running short as `None`.
#[derive(Debug)]
pub struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// Reads from the start of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }
    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.data.len()
    }
    /// Takes `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.data.len() < n {
            return None;
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Some(head)
    }
    /// Takes a big-endian u16.
    pub fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.bytes(2)?.try_into().ok()?))
    }
    /// Takes a big-endian u32.
    pub fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.bytes(4)?.try_into().ok()?))
    }
    /// Takes a big-endian u64.
    pub fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.bytes(8)?.try_into().ok()?))
    }
    /// Takes a string prefixed by its u32 length.
    pub fn string32(&mut self) -> Option<String> {
        let len = self.u32()? as usize;
        String::from_utf8(self.bytes(len)?.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips() {
        let b = encode_request(cmd_flag::REQ_ONE, cmd::BLOCK_STATUS, 7, 4096, 512);
        let r = decode_request(&b).unwrap();
        assert_eq!(
            r,
            RequestHeader {
                flags: cmd_flag::REQ_ONE,
                kind: cmd::BLOCK_STATUS,
                cookie: 7,
                offset: 4096,
                length: 512
            }
        );
        let mut bad = b;
        bad[0] ^= 1;
        assert!(decode_request(&bad).is_none());
    }

    #[test]
    fn magics_spell_their_names() {
        assert_eq!(&NBD_MAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }

    #[test]
    fn extents_merge_only_when_adjacent_and_equal() {
        let mut v = Vec::new();
        push_merged(
            &mut v,
            Extent {
                offset: 0,
                length: 10,
                flags: 1,
            },
        );
        push_merged(
            &mut v,
            Extent {
                offset: 10,
                length: 5,
                flags: 1,
            },
        );
        push_merged(
            &mut v,
            Extent {
                offset: 15,
                length: 5,
                flags: 0,
            },
        );
        push_merged(
            &mut v,
            Extent {
                offset: 30,
                length: 5,
                flags: 0,
            },
        );
        push_merged(
            &mut v,
            Extent {
                offset: 35,
                length: 0,
                flags: 0,
            },
        );
        assert_eq!(
            v,
            vec![
                Extent {
                    offset: 0,
                    length: 15,
                    flags: 1
                },
                Extent {
                    offset: 15,
                    length: 5,
                    flags: 0
                },
                Extent {
                    offset: 30,
                    length: 5,
                    flags: 0
                },
            ]
        );
    }

    #[test]
    fn cursor_reports_short_payloads() {
        let mut c = Cursor::new(&[0, 0, 0, 3, b'a', b'b']);
        assert_eq!(c.string32(), None);
        let mut c = Cursor::new(&[0, 0, 0, 2, b'a', b'b', 0, 1]);
        assert_eq!(c.string32().as_deref(), Some("ab"));
        assert_eq!(c.u16(), Some(1));
        assert_eq!(c.remaining(), 0);
    }
}
