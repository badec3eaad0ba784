//! Memory dump checksums.
//!
//! A dump's checksum covers the first `capacity` bytes of its volume, bytes
//! past a file's end counting as zeros, so that it is the same on every copy
//! of the dump: FILE or BLOCK, sparse or not, shrunk to the dump or not.
//! Two algorithms, named by a prefix in the checksum's text form:
//!
//! - `sha256:<hex>` (memory metadata version 1; a bare 64-digit hex value is
//!   read as this): SHA-256 of those bytes. One core, and every zero past
//!   the dump is hashed like data. Still verified, no longer written.
//! - `blake3-4m:<hex>` (version 2): the bytes are cut into 4 MiB chunks and
//!   each chunk has its own BLAKE3 digest, so chunks hash in parallel, and a
//!   chunk of zeros (found by a compare, or lying past the file's end) takes
//!   a precomputed digest instead of being hashed. The checksum is the BLAKE3
//!   of a header (a domain tag, the capacity, the chunk size) followed by the
//!   chunk digests in order. A flipped byte changes its chunk's digest; a
//!   truncation turns the chunks it cut into other digests.
//!
//! [`StreamHasher`] computes either from bytes read in order (a copy
//! stream); [`digest_file`] reads a file or a block device with several
//! threads.
use sha2::{Digest as _, Sha256};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// The chunk size of `blake3-4m`.
pub const CHUNK: usize = 4 << 20;
const BLAKE3_DOMAIN: &[u8] = b"ramsnap memory dump checksum blake3-4m\0";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    Sha256,
    Blake3Chunks,
}

impl Algorithm {
    /// What new dumps are checksummed with.
    pub const CURRENT: Algorithm = Algorithm::Blake3Chunks;

    pub fn tag(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Blake3Chunks => "blake3-4m",
        }
    }
}

/// A checksum, validated: an algorithm and 32 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Checksum {
    pub algorithm: Algorithm,
    pub bytes: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a checksum: want sha256:<64 hex digits>, blake3-4m:<64 hex digits>, or 64 hex digits (SHA-256)")]
pub struct ChecksumError(pub String);

impl FromStr for Checksum {
    type Err = ChecksumError;

    fn from_str(s: &str) -> Result<Checksum, ChecksumError> {
        let bad = || ChecksumError(crate::text::clip(s));
        let (algorithm, hex) = match s.split_once(':') {
            None => (Algorithm::Sha256, s),
            Some(("sha256", hex)) => (Algorithm::Sha256, hex),
            Some(("blake3-4m", hex)) => (Algorithm::Blake3Chunks, hex),
            Some(_) => return Err(bad()),
        };
        // The canonical form only: lowercase, so that equal checksums
        // are equal strings.
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(bad());
        }
        let mut bytes = [0u8; 32];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16).map_err(|_| bad())?;
        }
        Ok(Checksum { algorithm, bytes })
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.algorithm.tag())?;
        self.bytes.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl Checksum {
    /// The 64 hex digits alone (what version 1 metadata stores).
    pub fn hex(&self) -> String {
        self.bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// True when `a` and `b` name the same checksum (`sha256:` prefix or not).
pub fn same(a: &str, b: &str) -> bool {
    matches!((a.parse::<Checksum>(), b.parse::<Checksum>()), (Ok(x), Ok(y)) if x == y)
}

fn zero_chunk_digest() -> &'static [u8; 32] {
    static ZERO: OnceLock<[u8; 32]> = OnceLock::new();
    ZERO.get_or_init(|| *blake3::hash(&vec![0u8; CHUNK]).as_bytes())
}

static ZEROS: [u8; 4096] = [0; 4096];

/// Index of the last non-zero byte. Compares whole 4 KiB blocks with a zero
/// block (memcmp), then bytes in the last non-zero block only.
pub fn last_nonzero(buf: &[u8]) -> Option<usize> {
    let block = buf.chunks(4096).rposition(|b| b != &ZEROS[..b.len()])?;
    let start = block * 4096;
    let end = (start + 4096).min(buf.len());
    buf[start..end].iter().rposition(|&b| b != 0).map(|i| start + i)
}

/// The digest of one `blake3-4m` chunk of `len` bytes whose first
/// `data.len()` bytes are `data` and the rest zeros; and the index of its
/// last non-zero byte.
fn chunk_digest(data: &[u8], len: usize) -> ([u8; 32], Option<usize>) {
    debug_assert!(data.len() <= len && len <= CHUNK);
    let last = last_nonzero(data);
    if last.is_none() && len == CHUNK {
        return (*zero_chunk_digest(), None);
    }
    let mut h = blake3::Hasher::new();
    h.update(data);
    zeros_into(&mut h, len - data.len());
    (*h.finalize().as_bytes(), last)
}

fn chunk_count(capacity: u64) -> u64 {
    capacity.div_ceil(CHUNK as u64)
}

fn chunk_len(capacity: u64, index: u64) -> usize {
    (capacity - index * CHUNK as u64).min(CHUNK as u64) as usize
}

fn blake3_outer(capacity: u64) -> blake3::Hasher {
    let mut outer = blake3::Hasher::new();
    outer.update(BLAKE3_DOMAIN);
    outer.update(&capacity.to_le_bytes());
    outer.update(&(CHUNK as u64).to_le_bytes());
    outer
}

/// Computes a `blake3-4m` checksum from its chunks in any order, each
/// given whole by whoever read it (a copy's parallel readers): chunk
/// `index` covers bytes `[index * CHUNK, (index + 1) * CHUNK)` of the
/// first `capacity`. A chunk never given counts as zeros.
pub struct ChunkHasher {
    capacity: u64,
    digests: std::sync::Mutex<Vec<Option<[u8; 32]>>>,
}

impl ChunkHasher {
    pub fn new(capacity: u64) -> ChunkHasher {
        ChunkHasher {
            capacity,
            digests: std::sync::Mutex::new(vec![None; chunk_count(capacity) as usize]),
        }
    }

    /// Chunk `index`'s bytes from its start (`data`; fewer than the chunk
    /// holds: the rest are zeros). Out of range: ignored.
    pub fn chunk(&self, index: u64, data: &[u8]) {
        if index >= chunk_count(self.capacity) {
            return;
        }
        let len = chunk_len(self.capacity, index);
        let (d, _) = chunk_digest(&data[..data.len().min(len)], len);
        self.digests.lock().expect("digests")[index as usize] = Some(d);
    }

    pub fn finish(self) -> Checksum {
        let digests = self.digests.into_inner().expect("digests");
        let mut outer = blake3_outer(self.capacity);
        for (i, d) in digests.iter().enumerate() {
            match d {
                Some(d) => outer.update(d),
                None => outer.update(&chunk_digest(&[], chunk_len(self.capacity, i as u64)).0),
            };
        }
        Checksum {
            algorithm: Algorithm::Blake3Chunks,
            bytes: *outer.finalize().as_bytes(),
        }
    }
}

/// Computes a checksum from the volume's bytes in order, starting at 0
/// (a copy stream). Bytes past `capacity` are ignored; [`finish`] counts
/// what was not given as zeros.
///
/// [`finish`]: StreamHasher::finish
pub struct StreamHasher {
    capacity: u64,
    pos: u64,
    data_end: u64,
    state: StreamState,
}

enum StreamState {
    Sha256(Box<Sha256>),
    Blake3 {
        outer: Box<blake3::Hasher>,
        chunk: Box<blake3::Hasher>,
        /// Chunks done, bytes of the current one given so far, and
        /// whether any of them was not zero.
        done: u64,
        filled: usize,
        nonzero: bool,
    },
}

impl StreamHasher {
    pub fn new(algorithm: Algorithm, capacity: u64) -> StreamHasher {
        let state = match algorithm {
            Algorithm::Sha256 => StreamState::Sha256(Box::default()),
            Algorithm::Blake3Chunks => StreamState::Blake3 {
                outer: Box::new(blake3_outer(capacity)),
                chunk: Box::default(),
                done: 0,
                filled: 0,
                nonzero: false,
            },
        };
        StreamHasher {
            capacity,
            pos: 0,
            data_end: 0,
            state,
        }
    }

    pub fn update(&mut self, mut bytes: &[u8]) {
        let room = self.capacity - self.pos;
        if (bytes.len() as u64) > room {
            bytes = &bytes[..room as usize];
        }
        if let Some(i) = last_nonzero(bytes) {
            self.data_end = self.pos + i as u64 + 1;
        }
        match &mut self.state {
            StreamState::Sha256(h) => h.update(bytes),
            StreamState::Blake3 {
                outer,
                chunk,
                done,
                filled,
                nonzero,
            } => {
                while !bytes.is_empty() {
                    let n = (CHUNK - *filled).min(bytes.len());
                    let (now, rest) = bytes.split_at(n);
                    *nonzero |= last_nonzero(now).is_some();
                    // Hashing a chunk of zeros is left for its end: it may
                    // turn out to be the precomputed one.
                    if *nonzero {
                        if *filled > 0 && chunk.count() == 0 {
                            zeros_into(chunk, *filled);
                        }
                        chunk.update(now);
                    }
                    *filled += n;
                    bytes = rest;
                    if *filled == chunk_len(self.capacity, *done) {
                        finish_chunk(outer, chunk, *filled, *nonzero);
                        *done += 1;
                        *filled = 0;
                        *nonzero = false;
                    }
                    self.pos += n as u64;
                }
                return;
            }
        }
        self.pos += bytes.len() as u64;
    }

    /// Where the last non-zero byte given ends.
    pub fn data_end(&self) -> u64 {
        self.data_end
    }

    pub fn finish(mut self) -> Checksum {
        match self.state {
            StreamState::Sha256(mut h) => {
                let mut left = self.capacity - self.pos;
                while left > 0 {
                    let n = left.min(ZEROS.len() as u64) as usize;
                    h.update(&ZEROS[..n]);
                    left -= n as u64;
                }
                Checksum {
                    algorithm: Algorithm::Sha256,
                    bytes: h.finalize().into(),
                }
            }
            StreamState::Blake3 {
                ref mut outer,
                ref mut chunk,
                done,
                filled,
                nonzero,
            } => {
                let mut index = done;
                if filled > 0 {
                    let len = chunk_len(self.capacity, index);
                    if nonzero {
                        zeros_into(chunk, len - filled);
                    }
                    finish_chunk(outer, chunk, len, nonzero);
                    index += 1;
                }
                while index < chunk_count(self.capacity) {
                    let len = chunk_len(self.capacity, index);
                    outer.update(&chunk_digest(&[], len).0);
                    index += 1;
                }
                Checksum {
                    algorithm: Algorithm::Blake3Chunks,
                    bytes: *outer.finalize().as_bytes(),
                }
            }
        }
    }
}

fn zeros_into(h: &mut blake3::Hasher, mut n: usize) {
    while n > 0 {
        let k = n.min(ZEROS.len());
        h.update(&ZEROS[..k]);
        n -= k;
    }
}

/// Adds the digest of a chunk of `len` bytes to `outer`; `chunk` holds its
/// bytes when `nonzero`, nothing otherwise.
fn finish_chunk(outer: &mut blake3::Hasher, chunk: &mut blake3::Hasher, len: usize, nonzero: bool) {
    if nonzero {
        outer.update(chunk.finalize().as_bytes());
        chunk.reset();
    } else {
        outer.update(&chunk_digest(&[], len).0);
    }
}

/// The checksum of a file or a block device, and where its data ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDigest {
    pub checksum: Checksum,
    /// End of the last non-zero byte within `capacity`: the dump's size on
    /// a block device, where it cannot be told from the file length.
    pub data_end: u64,
    /// Length of the file (or device).
    pub len: u64,
}

/// The size of a regular file or of a block device.
pub fn device_len(f: &File) -> io::Result<u64> {
    let meta = f.metadata()?;
    if meta.file_type().is_block_device() {
        let mut g = f;
        let end = g.seek(SeekFrom::End(0))?;
        g.seek(SeekFrom::Start(0))?;
        Ok(end)
    } else {
        Ok(meta.len())
    }
}

const ALIGN: usize = 4096;

/// Reads chunk `index` of `f` (up to `readable`) into `buf`; returns how
/// many bytes it holds (less than the chunk past the end). `direct`: `buf`
/// is aligned and `f` opened with O_DIRECT (whole sectors are read).
fn read_chunk(f: &File, index: u64, readable: u64, buf: &mut [u8], direct: bool) -> io::Result<usize> {
    let offset = index * CHUNK as u64;
    if offset >= readable {
        return Ok(0);
    }
    let want = ((readable - offset) as usize).min(CHUNK);
    let padded = if direct { want.div_ceil(512) * 512 } else { want };
    let mut got = 0;
    while got < want {
        let n = f.read_at(&mut buf[got..padded], offset + got as u64)?;
        if n == 0 {
            // A file that shrank under us: the rest counts as zeros, as
            // past any file's end.
            break;
        }
        got += n;
    }
    Ok(got.min(want))
}

/// The checksum of the first `capacity` bytes of `path` (zeros past its
/// end) with `algorithm`.
///
/// `blake3-4m` hashes chunks on several threads, each reading its own
/// chunks: buffered on a regular file (a dump just written is in the page
/// cache), O_DIRECT on a block device (one buffered reader gets about
/// 100-200 MB/s through loop devices, several direct ones about 1 GB/s).
/// Chunks past a file's end are not read.
pub fn digest_file(path: &Path, capacity: u64, algorithm: Algorithm) -> io::Result<FileDigest> {
    digest_file_after(path, capacity, algorithm, None)
}

/// [`digest_file`], taking the chunks `followed` hashed while the file was
/// written as they are (`blake3-4m` only; ignored with another algorithm
/// or when `followed` was taken of another file or capacity).
pub fn digest_file_after(
    path: &Path,
    capacity: u64,
    algorithm: Algorithm,
    followed: Option<&Followed>,
) -> io::Result<FileDigest> {
    digest_file_upto(path, capacity, algorithm, followed, u64::MAX, false)
}

/// [`digest_file_after`], reading nothing at or past `zeros_from`: those
/// bytes count as zeros, as past a file's end. For a dump on a block
/// device, which cannot say where the dump ends: the caller knows the
/// volume holds zeros past there, or that nothing past there is part of
/// the dump. Sound for the checksum's purpose either way: a value computed
/// so matches the one recorded only if the recorded bytes past
/// `zeros_from` were zeros, so whatever a restore reads of the dump lies
/// before `zeros_from`, and was read here.
///
/// `through_cache`: a block device is read through the page cache, not
/// with O_DIRECT: for a dump that another process (QEMU restoring it)
/// reads at the same time, so that the device is read once, by whichever
/// comes first, and the other finds the pages cached.
pub fn digest_file_upto(
    path: &Path,
    capacity: u64,
    algorithm: Algorithm,
    followed: Option<&Followed>,
    zeros_from: u64,
    through_cache: bool,
) -> io::Result<FileDigest> {
    let f = File::open(path)?;
    let followed = match followed {
        Some(fw) if fw.capacity == capacity && fw.identity == identity(&f)? => Some(fw),
        _ => None,
    };
    let len = device_len(&f)?;
    let readable = len.min(capacity).min(zeros_from);
    if algorithm == Algorithm::Sha256 {
        return digest_sha256(path, f, len, readable, capacity);
    }
    let block = f.metadata()?.file_type().is_block_device() && !through_cache;
    let f = if block {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)?
    } else {
        f
    };
    let chunks = chunk_count(capacity);
    let with_data = chunk_count(readable);
    // Chunks hashed while the file was written: known unless the file has
    // shrunk below them since.
    let known = followed
        .filter(|fw| fw.end() <= with_data && fw.end() * CHUNK as u64 <= readable)
        .map_or(0..0, |fw| fw.first..fw.end());
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let workers = if block { cores.max(4) } else { cores }
        .clamp(1, 8)
        .min(with_data.max(1) as usize);

    let digests = Mutex::new(vec![[0u8; 32]; chunks as usize]);
    let next = AtomicU64::new(0);
    let data_end = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<io::Error>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                let mut storage = vec![0u8; CHUNK + ALIGN];
                let start = if block {
                    storage.as_ptr().align_offset(ALIGN)
                } else {
                    0
                };
                let buf = &mut storage[start..start + CHUNK];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= with_data || failed.load(Ordering::Relaxed) {
                        return;
                    }
                    if known.contains(&i) {
                        continue;
                    }
                    let n = match read_chunk(&f, i, readable, buf, block) {
                        Ok(n) => n,
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            first_error.lock().expect("error slot").get_or_insert(e);
                            return;
                        }
                    };
                    let (d, last) = chunk_digest(&buf[..n], chunk_len(capacity, i));
                    if let Some(last) = last {
                        data_end.fetch_max(i * CHUNK as u64 + last as u64 + 1, Ordering::Relaxed);
                    }
                    digests.lock().expect("digests")[i as usize] = d;
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().expect("error slot") {
        return Err(e);
    }
    let mut digests = digests.into_inner().expect("digests");
    let mut data_end = data_end.into_inner();
    if let Some(fw) = followed.filter(|_| !known.is_empty()) {
        digests[known.start as usize..known.end as usize].copy_from_slice(&fw.digests);
        data_end = data_end.max(fw.data_end);
    }
    for i in with_data..chunks {
        digests[i as usize] = chunk_digest(&[], chunk_len(capacity, i)).0;
    }
    let mut outer = blake3_outer(capacity);
    for d in &digests {
        outer.update(d);
    }
    Ok(FileDigest {
        checksum: Checksum {
            algorithm: Algorithm::Blake3Chunks,
            bytes: *outer.finalize().as_bytes(),
        },
        data_end,
        len,
    })
}

/// The device and inode of an open file.
fn identity(f: &File) -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = f.metadata()?;
    Ok((m.dev(), m.ino()))
}

/// The `blake3-4m` digests of chunks of a regular file taken while another
/// process was writing it: see [`follow_growing_file`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Followed {
    capacity: u64,
    identity: (u64, u64),
    /// The index of the first chunk hashed; `digests` has the following.
    first: u64,
    digests: Vec<[u8; 32]>,
    data_end: u64,
}

impl Followed {
    fn end(&self) -> u64 {
        self.first + self.digests.len() as u64
    }

    /// Bytes hashed while the file was written.
    pub fn bytes(&self) -> u64 {
        self.digests.len() as u64 * CHUNK as u64
    }
}

/// Hashes the chunks of a regular file that a writer is filling in order
/// (a dump that QEMU streams into it), each once the file has grown past
/// its end, until `stop` is set. So the checksum
/// after the dump ([`digest_file_after`]) has only the last chunks left.
///
/// Only for writers that never go back, except to chunk 0: it is never
/// taken here (libvirt rewrites its save image header when the dump ends).
/// The caller must know the file was written that way (see the host's
/// check of libvirt's save image format), else drop what this returns.
pub fn follow_growing_file(
    path: &Path,
    capacity: u64,
    stop: &AtomicBool,
    poll: std::time::Duration,
) -> io::Result<Followed> {
    follow_written(path, capacity, stop, poll, &mut |f: &File| {
        Ok(Some(f.metadata()?.len()))
    })
}

/// [`follow_growing_file`] for any file or device: `written(file)` says
/// how far the writer has written (everything before it is final, but
/// chunk 0), None while that is not known. A block device does not grow:
/// the caller asks the writer (see the host's `follow_block_dump`).
pub fn follow_written(
    path: &Path,
    capacity: u64,
    stop: &AtomicBool,
    poll: std::time::Duration,
    written: &mut dyn FnMut(&File) -> io::Result<Option<u64>>,
) -> io::Result<Followed> {
    let f = File::open(path)?;
    let mut out = Followed {
        capacity,
        identity: identity(&f)?,
        first: 1,
        digests: Vec::new(),
        data_end: 0,
    };
    let mut buf = vec![0u8; CHUNK];
    // Once stopped, what is left is hashed after, in parallel.
    while !stop.load(Ordering::Acquire) {
        let grown = written(&f)?.unwrap_or(0).min(capacity);
        while (out.end() + 1) * CHUNK as u64 <= grown && !stop.load(Ordering::Acquire) {
            let i = out.end();
            let n = read_chunk(&f, i, grown, &mut buf, false)?;
            if n < CHUNK {
                // Shrank under us: what is known so far stays.
                return Ok(out);
            }
            let (d, last) = chunk_digest(&buf, CHUNK);
            if let Some(last) = last {
                out.data_end = out.data_end.max(i * CHUNK as u64 + last as u64 + 1);
            }
            out.digests.push(d);
        }
        std::thread::sleep(poll);
    }
    Ok(out)
}

/// Version 1: SHA-256 in order. Chunks are read by several threads (direct
/// on a block device) and hashed in order as they arrive.
fn digest_sha256(path: &Path, f: File, len: u64, readable: u64, capacity: u64) -> io::Result<FileDigest> {
    let block = f.metadata()?.file_type().is_block_device();
    let mut hasher = StreamHasher::new(Algorithm::Sha256, capacity);
    if block {
        let direct = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)?;
        read_in_order(&direct, readable, true, &mut |c| hasher.update(c))?;
    } else {
        read_in_order(&f, readable, false, &mut |c| hasher.update(c))?;
    }
    let data_end = hasher.data_end();
    Ok(FileDigest {
        checksum: hasher.finish(),
        data_end,
        len,
    })
}

/// Feeds the chunks of `[0, readable)` to `take` in order, read by a few
/// threads; a short chunk ends the stream (the file shrank).
fn read_in_order(f: &File, readable: u64, direct: bool, take: &mut dyn FnMut(&[u8])) -> io::Result<()> {
    use std::collections::BTreeMap;
    use std::sync::{mpsc, Arc};
    const READERS: usize = 4;
    const BUFFERS: usize = 2 * READERS;
    let chunks = chunk_count(readable);
    let next = AtomicU64::new(0);
    std::thread::scope(|scope| {
        // Both channels live in this closure: whatever way it returns, the
        // readers see them closed and stop.
        let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
        for _ in 0..BUFFERS {
            let _ = free_tx.send(vec![0u8; CHUNK + ALIGN]);
        }
        let free_rx = Arc::new(Mutex::new(free_rx));
        let (full_tx, full_rx) = mpsc::channel::<io::Result<(u64, Vec<u8>, usize)>>();
        for _ in 0..READERS {
            let (next, free_rx, full_tx) = (&next, free_rx.clone(), full_tx.clone());
            // A reader takes a buffer before it takes the next chunk
            // number, so the lowest missing chunk always has a buffer.
            scope.spawn(move || loop {
                let Ok(mut buf) = free_rx.lock().expect("buffer pool").recv() else {
                    return;
                };
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= chunks {
                    return;
                }
                let start = if direct {
                    buf.as_ptr().align_offset(ALIGN)
                } else {
                    0
                };
                let r = read_chunk(f, i, readable, &mut buf[start..start + CHUNK], direct);
                let failed = r.is_err();
                if full_tx.send(r.map(|n| (i, buf, n))).is_err() || failed {
                    return;
                }
            });
        }
        drop(full_tx);
        let mut pending: BTreeMap<u64, (Vec<u8>, usize)> = BTreeMap::new();
        let mut want_next = 0u64;
        while want_next < chunks {
            let (i, buf, n) = match full_rx.recv() {
                Ok(r) => r?,
                Err(_) => return Err(io::Error::other("a reader stopped")),
            };
            pending.insert(i, (buf, n));
            while let Some((buf, n)) = pending.remove(&want_next) {
                let start = if direct {
                    buf.as_ptr().align_offset(ALIGN)
                } else {
                    0
                };
                take(&buf[start..start + n]);
                let short = n < chunk_len(readable, want_next);
                want_next += 1;
                let _ = free_tx.send(buf);
                if short {
                    return Ok(());
                }
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha256_hex(bytes: &[u8]) -> String {
        Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The definition of `blake3-4m`, written out the slow way.
    fn blake3_reference(bytes: &[u8], capacity: u64) -> Checksum {
        let mut padded = bytes[..bytes.len().min(capacity as usize)].to_vec();
        padded.resize(capacity as usize, 0);
        let mut outer = blake3::Hasher::new();
        outer.update(BLAKE3_DOMAIN);
        outer.update(&capacity.to_le_bytes());
        outer.update(&(CHUNK as u64).to_le_bytes());
        for c in padded.chunks(CHUNK) {
            outer.update(blake3::hash(c).as_bytes());
        }
        Checksum {
            algorithm: Algorithm::Blake3Chunks,
            bytes: *outer.finalize().as_bytes(),
        }
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8 | 1)
            .collect()
    }

    #[test]
    fn chunks_given_in_any_order_or_not_at_all_match_the_definition() {
        // 3 chunks and a part; chunk 1 zero (never given), the last one
        // given short (its zeros implied).
        let capacity = 3 * CHUNK as u64 + 1000;
        let mut bytes = data(3 * CHUNK + 500);
        bytes[CHUNK..2 * CHUNK].fill(0);
        let h = ChunkHasher::new(capacity);
        for i in [3u64, 2, 0] {
            let start = i as usize * CHUNK;
            h.chunk(i, &bytes[start..(start + CHUNK).min(bytes.len())]);
        }
        h.chunk(4, &[1]); // past the capacity: ignored
        assert_eq!(h.finish(), blake3_reference(&bytes, capacity));
        assert_ne!(
            ChunkHasher::new(capacity).finish(),
            blake3_reference(&bytes, capacity)
        );
        assert_eq!(
            ChunkHasher::new(capacity).finish(),
            blake3_reference(&[], capacity)
        );
    }

    #[test]
    fn text_forms_parse_and_print() {
        let hex = "ab".repeat(32);
        let bare: Checksum = hex.parse().unwrap();
        assert_eq!(bare.algorithm, Algorithm::Sha256);
        assert_eq!(bare.to_string(), format!("sha256:{hex}"));
        assert_eq!(format!("sha256:{hex}").parse::<Checksum>().unwrap(), bare);
        let b3: Checksum = format!("blake3-4m:{hex}").parse().unwrap();
        assert_eq!(b3.algorithm, Algorithm::Blake3Chunks);
        assert_eq!(b3.hex(), hex);
        assert!(same(&hex, &format!("sha256:{hex}")));
        assert!(!same(&hex, &format!("blake3-4m:{hex}")));
        for bad in [
            "",
            "xyz",
            &"ab".repeat(31),
            &format!("md5:{hex}"),
            &format!("blake3-4m:{}", "zz".repeat(32)),
            &format!("blake3-4m:{}é", "a".repeat(62)),
            &"a".repeat(10_000),
            &"AB".repeat(32),
        ] {
            assert!(bad.parse::<Checksum>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn both_algorithms_count_bytes_past_the_end_as_zeros_and_match_their_definition() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        let long = dir.path().join("long");
        // Not a whole number of chunks, nor of sectors.
        let bytes = data(2 * CHUNK + 100_003);
        std::fs::write(&short, &bytes).unwrap();
        let mut padded = bytes.clone();
        padded.resize(5 * CHUNK + 77, 0);
        std::fs::write(&long, &padded).unwrap();
        let cap = (4 * CHUNK + 12_345) as u64;
        for algorithm in [Algorithm::Sha256, Algorithm::Blake3Chunks] {
            let a = digest_file(&short, cap, algorithm).unwrap();
            let b = digest_file(&long, cap, algorithm).unwrap();
            assert_eq!(
                a.checksum, b.checksum,
                "{algorithm:?}: a file and its zero-padded copy"
            );
            assert_eq!(a.data_end, bytes.len() as u64);
            assert_eq!(b.data_end, bytes.len() as u64);
            assert_eq!((a.len, b.len), (bytes.len() as u64, padded.len() as u64));
            let expected = match algorithm {
                Algorithm::Sha256 => format!("sha256:{}", sha256_hex(&padded[..cap as usize])),
                Algorithm::Blake3Chunks => blake3_reference(&bytes, cap).to_string(),
            };
            assert_eq!(a.checksum.to_string(), expected);
            // The stream hasher agrees, however the stream is cut.
            for piece in [1 << 20, 4096 + 7, CHUNK, 3 * CHUNK] {
                let mut h = StreamHasher::new(algorithm, cap);
                padded.chunks(piece).for_each(|c| h.update(c));
                assert_eq!(h.data_end(), bytes.len() as u64);
                assert_eq!(h.finish(), a.checksum, "{algorithm:?} in pieces of {piece}");
            }
            let mut h = StreamHasher::new(algorithm, cap);
            h.update(&bytes[..1000]);
            h.update(&bytes[1000..]);
            assert_eq!(h.finish(), a.checksum, "{algorithm:?}: stream that stops early");
        }
    }

    #[test]
    fn a_flipped_byte_anywhere_or_a_truncation_changes_the_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dump");
        let bytes = data(3 * CHUNK + 5000);
        let cap = (4 * CHUNK) as u64;
        std::fs::write(&p, &bytes).unwrap();
        let good = digest_file(&p, cap, Algorithm::Blake3Chunks).unwrap().checksum;
        for at in [0, 1, CHUNK - 1, CHUNK, 2 * CHUNK + 17, bytes.len() - 1] {
            let mut b = bytes.clone();
            b[at] ^= 0x40;
            std::fs::write(&p, &b).unwrap();
            assert_ne!(
                digest_file(&p, cap, Algorithm::Blake3Chunks).unwrap().checksum,
                good,
                "flip at {at}"
            );
        }
        // A byte in the zeros past the data (inside the capacity) counts.
        let mut b = bytes.clone();
        b.resize(cap as usize, 0);
        b[3 * CHUNK + 9000] = 1;
        std::fs::write(&p, &b).unwrap();
        assert_ne!(
            digest_file(&p, cap, Algorithm::Blake3Chunks).unwrap().checksum,
            good
        );
        for cut in [bytes.len() - 1, 3 * CHUNK, CHUNK + 1, 0] {
            std::fs::write(&p, &bytes[..cut]).unwrap();
            assert_ne!(
                digest_file(&p, cap, Algorithm::Blake3Chunks).unwrap().checksum,
                good,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn bytes_past_zeros_from_are_not_read_and_count_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dump");
        let bytes = data(2 * CHUNK + 100_003);
        let cap = (5 * CHUNK) as u64;
        let mut padded = bytes.clone();
        padded.resize(cap as usize, 0);
        std::fs::write(&p, &padded).unwrap();
        for algorithm in [Algorithm::Sha256, Algorithm::Blake3Chunks] {
            let full = digest_file(&p, cap, algorithm).unwrap();
            // Anywhere at or past the data's end: the same value.
            for from in [bytes.len() as u64, 3 * CHUNK as u64, cap, u64::MAX] {
                let d = digest_file_upto(&p, cap, algorithm, None, from, false).unwrap();
                assert_eq!(d, full, "{algorithm:?} from {from}");
            }
            // Bytes past it are not read: garbage there leaves the value.
            let mut dirty = padded.clone();
            dirty[4 * CHUNK + 5] = 0xff;
            std::fs::write(&p, &dirty).unwrap();
            let d = digest_file_upto(&p, cap, algorithm, None, 3 * CHUNK as u64, false).unwrap();
            assert_eq!(d.checksum, full.checksum, "{algorithm:?}: garbage past the bound");
            assert_ne!(digest_file(&p, cap, algorithm).unwrap().checksum, full.checksum);
            std::fs::write(&p, &padded).unwrap();
            // A bound inside the data: another value, and data_end says
            // where the bytes read end.
            let cut = bytes.len() as u64 - 1;
            let d = digest_file_upto(&p, cap, algorithm, None, cut, false).unwrap();
            assert_ne!(d.checksum, full.checksum, "{algorithm:?}: bound inside the data");
            assert!(d.data_end <= cut);
        }
    }

    #[test]
    fn a_capacity_of_zero_and_an_empty_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("empty");
        std::fs::write(&p, b"").unwrap();
        for algorithm in [Algorithm::Sha256, Algorithm::Blake3Chunks] {
            let d = digest_file(&p, 0, algorithm).unwrap();
            assert_eq!(d.checksum, StreamHasher::new(algorithm, 0).finish());
            assert_eq!(d.data_end, 0);
            let d = digest_file(&p, (2 * CHUNK) as u64, algorithm).unwrap();
            assert_eq!(
                d.checksum,
                StreamHasher::new(algorithm, (2 * CHUNK) as u64).finish()
            );
        }
    }

    #[test]
    fn parallel_direct_reads_deliver_every_chunk_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("data");
        // Several chunks, and a tail that is not a whole chunk.
        let bytes = data(3 * CHUNK + 8192);
        std::fs::write(&p, &bytes).unwrap();
        let f = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&p)
        {
            Ok(f) => f,
            // A file system without O_DIRECT (tmpfs): nothing to check here.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return,
            Err(e) => panic!("{e}"),
        };
        let mut got = Vec::new();
        match read_in_order(&f, bytes.len() as u64, true, &mut |c| got.extend_from_slice(c)) {
            Ok(()) => assert!(got == bytes, "the chunks came out of order or wrong"),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => panic!("{e}"),
        }
        assert_eq!(last_nonzero(&[0, 0, 3, 0]), Some(2));
        assert_eq!(last_nonzero(&[0; 9000]), None);
    }

    #[test]
    fn chunks_hashed_while_a_file_grew_give_the_same_checksum() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dump");
        std::fs::write(&p, b"").unwrap();
        let bytes = data(6 * CHUNK + 4321);
        let cap = (8 * CHUNK) as u64;
        let stop = AtomicBool::new(false);
        let followed = std::thread::scope(|scope| {
            let follower =
                scope.spawn(|| follow_growing_file(&p, cap, &stop, std::time::Duration::from_millis(1)));
            // A writer in pieces that are not chunks, with pauses.
            let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
            for piece in bytes.chunks(CHUNK / 3 + 11) {
                f.write_all(piece).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
            stop.store(true, Ordering::Release);
            follower.join().unwrap().unwrap()
        });
        // Chunk 0 is left for the end, chunk 6 is not whole; how many of
        // the others it took depends on the machine's pace.
        assert_eq!(followed.first, 1);
        assert!((2..=6).contains(&followed.end()), "{}", followed.end());
        let whole = digest_file(&p, cap, Algorithm::Blake3Chunks).unwrap();
        let after = digest_file_after(&p, cap, Algorithm::Blake3Chunks, Some(&followed)).unwrap();
        assert_eq!(after, whole);

        // The header rewritten at the end (chunk 0) counts.
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(b"final header", 0).unwrap();
        let after = digest_file_after(&p, cap, Algorithm::Blake3Chunks, Some(&followed)).unwrap();
        assert_ne!(after, whole);
        assert_eq!(after, digest_file(&p, cap, Algorithm::Blake3Chunks).unwrap());

        // Taken of another file (a new inode under the name), another
        // capacity, or of chunks the file no longer has: not used.
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, &bytes).unwrap();
        let fresh = digest_file(&p, cap, Algorithm::Blake3Chunks).unwrap();
        assert_eq!(
            digest_file_after(&p, cap, Algorithm::Blake3Chunks, Some(&followed)).unwrap(),
            fresh
        );
        let mut stale = followed.clone();
        stale.identity = identity(&File::open(&p).unwrap()).unwrap();
        stale.digests[2] = [7; 32];
        assert_ne!(
            digest_file_after(&p, cap, Algorithm::Blake3Chunks, Some(&stale)).unwrap(),
            fresh,
            "the digests are taken as they are"
        );
        assert_eq!(
            digest_file_after(&p, cap + CHUNK as u64, Algorithm::Blake3Chunks, Some(&stale)).unwrap(),
            digest_file(&p, cap + CHUNK as u64, Algorithm::Blake3Chunks).unwrap()
        );
        std::fs::write(&p, &bytes[..2 * CHUNK]).unwrap();
        assert_eq!(
            digest_file_after(&p, cap, Algorithm::Blake3Chunks, Some(&stale)).unwrap(),
            digest_file(&p, cap, Algorithm::Blake3Chunks).unwrap()
        );
    }

    #[test]
    fn a_missing_file_is_an_error() {
        assert!(digest_file(Path::new("/nonexistent/ramsnap"), 10, Algorithm::Blake3Chunks).is_err());
    }
}
