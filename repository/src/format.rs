//! The on-storage format: object names, the sealed-object envelope, keys,
//! chunk ids and the binary layouts of pack, pack-index and disk-index objects.
//!
//! Everything here is pure (no I/O) so it is unit-tested alone and a reader in
//! another language can follow `docs/repository-format.md` line by line.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The format version written by this crate; a repository with a higher
/// version is refused.
pub const FORMAT_VERSION: u32 = 1;

/// Name of the configuration object at the root of a repository.
pub const CONFIG_KEY: &str = "config";

const OBJECT_MAGIC: &[u8; 4] = b"CRNO";
const HEADER_LEN: usize = 8;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const CHECKSUM_LEN: usize = 32;
const PACK_MAGIC: &[u8; 8] = b"CRNPACK1";

/// Errors decoding or authenticating stored bytes.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The object is shorter than its header says.
    #[error("the object is truncated")]
    Truncated,
    /// The object does not start with the Cairn magic bytes.
    #[error("the object is not a Cairn repository object")]
    BadMagic,
    /// The envelope version is not one this build knows.
    #[error("the object has envelope version {0}, which this build cannot read")]
    UnknownVersion(u8),
    /// The object kind differs from the one expected at this name.
    #[error("the object is of kind {found}, expected {expected}")]
    WrongKind {
        /// Kind byte expected.
        expected: u8,
        /// Kind byte found.
        found: u8,
    },
    /// The object is encrypted but the repository is not, or the reverse.
    #[error("the object's encryption flag does not match the repository")]
    EncryptionMismatch,
    /// AEAD authentication failed: the object was modified or the key is wrong.
    #[error("the object failed authentication (corrupted, or written with another key)")]
    Authentication,
    /// The BLAKE3 checksum of an unencrypted object does not match.
    #[error("the object's checksum does not match its contents")]
    Checksum,
    /// The chunk decoded, but its keyed hash is not the id it is stored under.
    #[error("the chunk's contents do not hash to its id")]
    ChunkIdMismatch,
    /// zstd could not decompress the payload.
    #[error("the payload could not be decompressed")]
    Decompress(#[source] std::io::Error),
    /// The payload's binary or JSON layout is invalid.
    #[error("the payload is malformed: {0}")]
    Malformed(String),
}

/// What a sealed object holds; stored in its header and bound into the AEAD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ObjectKind {
    /// One chunk of disk data inside a pack.
    Chunk = 1,
    /// The list of chunks in a pack (index object and pack trailer).
    PackIndex = 2,
    /// The chunk ids of one disk in one snapshot.
    DiskIndex = 3,
    /// A snapshot manifest (JSON).
    Manifest = 4,
    /// An ingest lock (JSON).
    Lock = 5,
    /// A GC record of packs condemned for deletion (JSON).
    Condemned = 6,
}

/// Payload compression of one sealed object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// zstd, level 3 (the default).
    #[default]
    Zstd,
    /// Stored as is.
    None,
}

/// A 32-byte chunk id: BLAKE3 keyed with the namespace's chunk-id key, over
/// the chunk's plaintext. All-zero means "a chunk of zeros, not stored".
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The id recorded for a chunk that is entirely zero (never stored).
    pub const ZERO: ChunkId = ChunkId([0; 32]);

    /// Whether this is the zero-chunk marker.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 32]
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", hex::encode(&self.0[..8]))
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// Keys derived from the repository key (or, unencrypted, from the config).
#[derive(Clone)]
pub struct Keys {
    cipher: Option<Aes256Gcm>,
    chunk_id_base: [u8; 32],
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keys")
            .field("encrypted", &self.cipher.is_some())
            .finish_non_exhaustive()
    }
}

/// The key material of an encrypted repository derives these values.
pub struct DerivedKeys {
    /// AES-256-GCM key for every object.
    pub data_key: [u8; 32],
    /// Base key that, mixed with a namespace, keys chunk ids.
    pub chunk_id_base: [u8; 32],
    /// Key check value recorded in the config (hex).
    pub key_check: String,
}

/// Derives all keys from the secret key material and the repository id.
pub fn derive_keys(material: &[u8], repository_id: &str) -> DerivedKeys {
    let mut input = Vec::with_capacity(material.len() + repository_id.len() + 1);
    input.extend_from_slice(repository_id.as_bytes());
    input.push(0);
    input.extend_from_slice(material);
    let root = blake3::derive_key("cairn-repo v1 root key", &input);
    let data_key = blake3::derive_key("cairn-repo v1 data key", &root);
    let chunk_id_base = blake3::derive_key("cairn-repo v1 chunk id key", &root);
    let check_key = blake3::derive_key("cairn-repo v1 key check", &root);
    let key_check = hex::encode(blake3::keyed_hash(&check_key, b"cairn key check").as_bytes());
    DerivedKeys {
        data_key,
        chunk_id_base,
        key_check,
    }
}

impl Keys {
    /// Keys of an encrypted repository.
    pub fn encrypted(derived: &DerivedKeys) -> Keys {
        Keys {
            cipher: Some(Aes256Gcm::new((&derived.data_key).into())),
            chunk_id_base: derived.chunk_id_base,
        }
    }

    /// Keys of an unencrypted repository (the chunk-id key comes from the config).
    pub fn unencrypted(chunk_id_base: [u8; 32]) -> Keys {
        Keys {
            cipher: None,
            chunk_id_base,
        }
    }

    /// Whether objects are encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.cipher.is_some()
    }

    /// The chunk-id key of a namespace: dedup within it, none across.
    pub fn namespace_key(&self, namespace: &str) -> NamespaceKey {
        let mut input = b"namespace\0".to_vec();
        input.extend_from_slice(namespace.as_bytes());
        NamespaceKey(*blake3::keyed_hash(&self.chunk_id_base, &input).as_bytes())
    }

    /// Seals `payload` into the envelope: header, then AES-256-GCM (nonce,
    /// ciphertext, tag) or plaintext plus a BLAKE3 checksum. `aad` binds the
    /// object to its context (a chunk's id, a pack's id).
    pub fn seal(
        &self,
        kind: ObjectKind,
        payload: &[u8],
        compression: Compression,
        aad: &[u8],
    ) -> Vec<u8> {
        let (comp, body) = match compression {
            Compression::Zstd => match zstd::bulk::compress(payload, 3) {
                Ok(c) if c.len() < payload.len() => (1u8, std::borrow::Cow::Owned(c)),
                _ => (0u8, std::borrow::Cow::Borrowed(payload)),
            },
            Compression::None => (0u8, std::borrow::Cow::Borrowed(payload)),
        };
        let enc = u8::from(self.cipher.is_some());
        let header = [
            OBJECT_MAGIC[0],
            OBJECT_MAGIC[1],
            OBJECT_MAGIC[2],
            OBJECT_MAGIC[3],
            1,
            kind as u8,
            enc,
            comp,
        ];
        let mut out = Vec::with_capacity(HEADER_LEN + NONCE_LEN + body.len() + TAG_LEN);
        out.extend_from_slice(&header);
        match &self.cipher {
            Some(cipher) => {
                let mut nonce = [0u8; NONCE_LEN];
                rand::rng().fill_bytes(&mut nonce);
                let mut full_aad = header.to_vec();
                full_aad.extend_from_slice(aad);
                let ct = cipher
                    .encrypt(
                        Nonce::from_slice(&nonce),
                        Payload {
                            msg: &body,
                            aad: &full_aad,
                        },
                    )
                    .expect("AES-GCM encryption of an in-memory buffer cannot fail");
                out.extend_from_slice(&nonce);
                out.extend_from_slice(&ct);
            }
            None => {
                out.extend_from_slice(&body);
                let mut hasher = blake3::Hasher::new();
                hasher.update(&out);
                hasher.update(aad);
                out.extend_from_slice(hasher.finalize().as_bytes());
            }
        }
        out
    }

    /// Opens an envelope made by [`Keys::seal`], authenticating it.
    pub fn open(
        &self,
        kind: ObjectKind,
        sealed: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, FormatError> {
        if sealed.len() < HEADER_LEN {
            return Err(FormatError::Truncated);
        }
        let header = &sealed[..HEADER_LEN];
        if &header[..4] != OBJECT_MAGIC {
            return Err(FormatError::BadMagic);
        }
        if header[4] != 1 {
            return Err(FormatError::UnknownVersion(header[4]));
        }
        if header[5] != kind as u8 {
            return Err(FormatError::WrongKind {
                expected: kind as u8,
                found: header[5],
            });
        }
        let body = match (&self.cipher, header[6]) {
            (Some(cipher), 1) => {
                if sealed.len() < HEADER_LEN + NONCE_LEN + TAG_LEN {
                    return Err(FormatError::Truncated);
                }
                let nonce = &sealed[HEADER_LEN..HEADER_LEN + NONCE_LEN];
                let mut full_aad = header.to_vec();
                full_aad.extend_from_slice(aad);
                cipher
                    .decrypt(
                        Nonce::from_slice(nonce),
                        Payload {
                            msg: &sealed[HEADER_LEN + NONCE_LEN..],
                            aad: &full_aad,
                        },
                    )
                    .map_err(|_| FormatError::Authentication)?
            }
            (None, 0) => {
                if sealed.len() < HEADER_LEN + CHECKSUM_LEN {
                    return Err(FormatError::Truncated);
                }
                let (data, sum) = sealed.split_at(sealed.len() - CHECKSUM_LEN);
                let mut hasher = blake3::Hasher::new();
                hasher.update(data);
                hasher.update(aad);
                if hasher.finalize().as_bytes() != sum {
                    return Err(FormatError::Checksum);
                }
                data[HEADER_LEN..].to_vec()
            }
            _ => return Err(FormatError::EncryptionMismatch),
        };
        match header[7] {
            0 => Ok(body),
            1 => zstd::stream::decode_all(&body[..]).map_err(FormatError::Decompress),
            other => Err(FormatError::Malformed(format!(
                "unknown compression {other}"
            ))),
        }
    }
}

/// The chunk-id key of one namespace.
#[derive(Clone, Copy)]
pub struct NamespaceKey([u8; 32]);

impl NamespaceKey {
    /// The id of a chunk's plaintext.
    pub fn chunk_id(&self, data: &[u8]) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.0, data).as_bytes())
    }
}

/// A random id, as 32 lowercase hex digits (packs, locks, repositories).
pub fn random_id() -> String {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// Object name of a pack.
pub fn pack_key(pack: &str) -> String {
    format!("packs/{}/{pack}", &pack[..2])
}

/// Pack id from a pack's object name.
pub fn pack_id_of_key(key: &str) -> Option<&str> {
    let rest = key.strip_prefix("packs/")?;
    let (_, id) = rest.split_once('/')?;
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

/// Object name of a snapshot manifest.
pub fn manifest_key(snapshot: &str) -> String {
    format!("snapshots/{snapshot}/manifest")
}

/// Object name of one disk index of a snapshot.
pub fn disk_index_key(snapshot: &str, position: usize) -> String {
    format!("snapshots/{snapshot}/disk-{position}.index")
}

/// Object name of an ingest lock.
pub fn lock_key(lock: &str) -> String {
    format!("locks/{lock}")
}

/// One chunk inside a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    /// The chunk's id.
    pub id: ChunkId,
    /// Byte offset of the sealed chunk in the pack.
    pub offset: u64,
    /// Length of the sealed chunk.
    pub length: u32,
    /// Length of the chunk's plaintext.
    pub raw_length: u32,
}

const PACK_ENTRY_LEN: usize = 32 + 8 + 4 + 4;

/// Encodes pack entries (the payload of a pack index and a pack trailer).
pub fn encode_pack_entries(entries: &[PackEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + entries.len() * PACK_ENTRY_LEN);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        out.extend_from_slice(&e.id.0);
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.length.to_le_bytes());
        out.extend_from_slice(&e.raw_length.to_le_bytes());
    }
    out
}

/// Decodes pack entries.
pub fn decode_pack_entries(data: &[u8]) -> Result<Vec<PackEntry>, FormatError> {
    if data.len() < 4 {
        return Err(FormatError::Truncated);
    }
    let n = u32::from_le_bytes(data[..4].try_into().expect("4 bytes")) as usize;
    if data.len() != 4 + n * PACK_ENTRY_LEN {
        return Err(FormatError::Malformed(format!(
            "pack index of {} bytes cannot hold {n} entries",
            data.len()
        )));
    }
    Ok(data[4..]
        .chunks_exact(PACK_ENTRY_LEN)
        .map(|e| PackEntry {
            id: ChunkId(e[..32].try_into().expect("32 bytes")),
            offset: u64::from_le_bytes(e[32..40].try_into().expect("8 bytes")),
            length: u32::from_le_bytes(e[40..44].try_into().expect("4 bytes")),
            raw_length: u32::from_le_bytes(e[44..48].try_into().expect("4 bytes")),
        })
        .collect())
}

/// Appends the pack trailer: the sealed pack index, its length, the magic.
/// The trailer is the only index of a pack, so a pack is one object, written
/// atomically.
pub fn append_pack_trailer(pack: &mut Vec<u8>, sealed_entries: &[u8]) {
    pack.extend_from_slice(sealed_entries);
    pack.extend_from_slice(&(sealed_entries.len() as u32).to_le_bytes());
    pack.extend_from_slice(PACK_MAGIC);
}

/// Length of the fixed end of a pack (index length and magic).
pub const PACK_TAIL_LEN: usize = 12;

/// Given the last bytes of a pack, returns the length of its sealed index.
pub fn pack_trailer_len(tail: &[u8]) -> Result<usize, FormatError> {
    if tail.len() < PACK_TAIL_LEN {
        return Err(FormatError::Truncated);
    }
    let end = &tail[tail.len() - PACK_TAIL_LEN..];
    if &end[4..] != PACK_MAGIC {
        return Err(FormatError::BadMagic);
    }
    Ok(u32::from_le_bytes(end[..4].try_into().expect("4 bytes")) as usize)
}

/// The ids of one disk in one snapshot, in disk order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskIndex {
    /// Virtual size of the disk in bytes.
    pub size: u64,
    /// Chunk size of the repository.
    pub chunk_size: u32,
    /// One id per chunk; [`ChunkId::ZERO`] for a chunk of zeros.
    pub chunks: Vec<ChunkId>,
}

impl DiskIndex {
    /// Encodes the index payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + self.chunks.len() * 32);
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        for c in &self.chunks {
            out.extend_from_slice(&c.0);
        }
        out
    }

    /// Decodes an index payload.
    pub fn decode(data: &[u8]) -> Result<DiskIndex, FormatError> {
        if data.len() < 24 {
            return Err(FormatError::Truncated);
        }
        let size = u64::from_le_bytes(data[..8].try_into().expect("8"));
        let chunk_size = u32::from_le_bytes(data[8..12].try_into().expect("4"));
        let n = u64::from_le_bytes(data[16..24].try_into().expect("8")) as usize;
        if chunk_size == 0
            || data.len() != 24 + n * 32
            || n as u64 != size.div_ceil(chunk_size as u64)
        {
            return Err(FormatError::Malformed(
                "the disk index's size, chunk size and chunk count disagree".into(),
            ));
        }
        let chunks = data[24..]
            .chunks_exact(32)
            .map(|c| ChunkId(c.try_into().expect("32")))
            .collect();
        Ok(DiskIndex {
            size,
            chunk_size,
            chunks,
        })
    }
}

/// The repository configuration object (plain JSON, written once at init).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Config {
    /// Always `cairn-repository`.
    pub format: String,
    /// Format version ([`FORMAT_VERSION`]).
    pub version: u32,
    /// Random repository id; salts the key derivation.
    pub id: String,
    /// When the repository was initialised.
    pub created: chrono::DateTime<chrono::Utc>,
    /// Fixed chunk size in bytes (power of two, 64 KiB – 16 MiB).
    pub chunk_size: u32,
    /// Target size of pack objects in bytes.
    pub pack_size: u32,
    /// Compression for new objects.
    pub compression: Compression,
    /// Encryption parameters; absent for an unencrypted repository.
    pub encryption: Option<EncryptionConfig>,
    /// Chunk-id base key of an unencrypted repository (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_id_key: Option<String>,
}

/// Encryption parameters recorded in the config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EncryptionConfig {
    /// Always `aes-256-gcm`.
    pub algorithm: String,
    /// Always `blake3-derive-key`.
    pub kdf: String,
    /// Keyed hash proving the key without revealing it (hex).
    pub key_check: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(enc: bool) -> Keys {
        if enc {
            Keys::encrypted(&derive_keys(b"0123456789abcdef0123456789abcdef", "repo"))
        } else {
            Keys::unencrypted([7; 32])
        }
    }

    #[test]
    fn seal_round_trips_and_detects_tampering() {
        for enc in [false, true] {
            let k = keys(enc);
            let payload = vec![42u8; 10_000];
            let sealed = k.seal(ObjectKind::Chunk, &payload, Compression::Zstd, b"ctx");
            assert!(sealed.len() < 1000, "zeros compress");
            assert_eq!(k.open(ObjectKind::Chunk, &sealed, b"ctx").unwrap(), payload);
            assert!(k.open(ObjectKind::Chunk, &sealed, b"other").is_err());
            assert!(k.open(ObjectKind::Manifest, &sealed, b"ctx").is_err());
            let mut bad = sealed.clone();
            let mid = bad.len() / 2;
            bad[mid] ^= 1;
            assert!(k.open(ObjectKind::Chunk, &bad, b"ctx").is_err());
        }
    }

    #[test]
    fn wrong_key_fails_authentication() {
        let a = keys(true);
        let b = Keys::encrypted(&derive_keys(b"another key material, 32 bytes!!", "repo"));
        let sealed = a.seal(ObjectKind::Manifest, b"{}", Compression::None, b"");
        assert!(matches!(
            b.open(ObjectKind::Manifest, &sealed, b""),
            Err(FormatError::Authentication)
        ));
    }

    #[test]
    fn chunk_ids_are_keyed_per_namespace() {
        let k = keys(true);
        let a = k.namespace_key("a").chunk_id(b"data");
        let b = k.namespace_key("b").chunk_id(b"data");
        assert_ne!(a, b);
        assert_eq!(a, k.namespace_key("a").chunk_id(b"data"));
    }

    #[test]
    fn layouts_round_trip() {
        let entries = vec![PackEntry {
            id: ChunkId([3; 32]),
            offset: 9,
            length: 10,
            raw_length: 11,
        }];
        assert_eq!(
            decode_pack_entries(&encode_pack_entries(&entries)).unwrap(),
            entries
        );
        let idx = DiskIndex {
            size: 65536 * 2 + 1,
            chunk_size: 65536,
            chunks: vec![ChunkId::ZERO, ChunkId([1; 32]), ChunkId([2; 32])],
        };
        assert_eq!(DiskIndex::decode(&idx.encode()).unwrap(), idx);
        assert!(DiskIndex::decode(&idx.encode()[..50]).is_err());
    }
}
