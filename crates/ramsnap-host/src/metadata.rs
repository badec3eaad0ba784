//! The memory metadata volume's format (versioned JSON, NUL-padded to the
//! volume's capacity), and how the dump volume is readied for a dump.
//!
//! The dump's checksum (see `ramsnap_common::checksum`) covers the dump
//! volume's first `capacity` bytes, where bytes past a file's end count as
//! zeros. A FILE dump shrinks to the dump's size (libvirt opens it with
//! O_TRUNC), a BLOCK dump does not (it reads as zeros before the dump: zeroed by the storage service when made, or scrubbed by the host when its pair is marked as written, see `pair_is_clean`), and a
//! storage copy copies exactly `capacity` bytes, zero-filling past the end:
//! the checksum is the same on every copy.
//!
//! Version 1 records the checksum as `dump.sha256` (hex SHA-256); version 2
//! as `dump.checksum` in its text form (`blake3-4m:<hex>`). Both are read.
use crate::model::{SnapshotMode, VolumeRef};
use ramsnap_common::checksum::Checksum;
pub use ramsnap_common::checksum::{device_len, digest_file, Algorithm, FileDigest, Followed, CHUNK};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use uuid::Uuid;

pub const FORMAT: &str = "ramsnap.memory-metadata";
pub const VERSION: u32 = 2;
/// The document and its padding use at most this much of the volume (1 MiB
/// volumes in practice), whatever capacity the volume reports.
pub const MAX_DOCUMENT: u64 = 16 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryMetadata {
    pub format: String,
    pub version: u32,
    pub vm_id: Uuid,
    pub snapshot_id: Uuid,
    /// Unix seconds.
    pub created_at: i64,
    pub mode: SnapshotMode,
    pub disks: Vec<DiskRecord>,
    pub dump: DumpRecord,
    /// The domain XML the memory was saved with.
    pub domain_xml: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// The volume frozen at dump time: the disk's leaf before the overlay.
    pub current: VolumeRef,
    pub overlay: VolumeRef,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "DumpRecordDoc", into = "DumpRecordDoc")]
pub struct DumpRecord {
    pub volume: VolumeRef,
    /// The dump volume's capacity: the checksum covers this many bytes.
    pub capacity: u64,
    pub dump_bytes: u64,
    pub checksum: Checksum,
}

/// [`DumpRecord`] as stored: `checksum` (version 2) or `sha256` (1).
#[derive(Serialize, Deserialize)]
struct DumpRecordDoc {
    volume: VolumeRef,
    capacity: u64,
    dump_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    checksum: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
}

impl TryFrom<DumpRecordDoc> for DumpRecord {
    type Error = String;

    fn try_from(d: DumpRecordDoc) -> Result<DumpRecord, String> {
        let checksum = match (d.checksum, d.sha256) {
            (Some(c), _) => c.parse().map_err(|e| format!("dump.checksum: {e}"))?,
            (None, Some(hex)) if hex.len() == 64 => hex.parse().map_err(|e| format!("dump.sha256: {e}"))?,
            (None, Some(_)) => return Err("dump.sha256 is not 64 hex digits".into()),
            (None, None) => return Err("the dump has no checksum".into()),
        };
        Ok(DumpRecord {
            volume: d.volume,
            capacity: d.capacity,
            dump_bytes: d.dump_bytes,
            checksum,
        })
    }
}

impl From<DumpRecord> for DumpRecordDoc {
    fn from(r: DumpRecord) -> DumpRecordDoc {
        DumpRecordDoc {
            volume: r.volume,
            capacity: r.capacity,
            dump_bytes: r.dump_bytes,
            checksum: Some(r.checksum.to_string()),
            sha256: None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("not a ramsnap memory metadata document: {0}")]
    Invalid(String),
    #[error("metadata version {0} is newer than this host reads")]
    Version(u32),
}

impl MemoryMetadata {
    /// The JSON document padded with NULs to `capacity` bytes; None when it
    /// does not fit (one NUL at least must follow it).
    pub fn encode(&self, capacity: u64) -> Option<Vec<u8>> {
        let capacity = capacity.min(MAX_DOCUMENT);
        let mut bytes = serde_json::to_vec(self).expect("metadata serializes");
        if bytes.len() as u64 >= capacity {
            return None;
        }
        bytes.resize(capacity as usize, 0);
        Some(bytes)
    }

    pub fn encoded_len(&self) -> usize {
        serde_json::to_vec(self).map(|v| v.len()).unwrap_or(usize::MAX)
    }

    /// Reads the document up to its first NUL; fields it does not know are
    /// ignored (a newer minor addition), a newer version is refused.
    pub fn decode(bytes: &[u8]) -> Result<MemoryMetadata, DecodeError> {
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        let doc = &bytes[..end];
        if doc.is_empty() {
            return Err(DecodeError::Invalid("the volume is empty".into()));
        }
        #[derive(Deserialize)]
        struct Head {
            format: String,
            version: u32,
        }
        let head: Head = serde_json::from_slice(doc).map_err(|e| DecodeError::Invalid(e.to_string()))?;
        if head.format != FORMAT {
            return Err(DecodeError::Invalid(format!("format is {:?}", head.format)));
        }
        if head.version > VERSION {
            return Err(DecodeError::Version(head.version));
        }
        serde_json::from_slice(doc).map_err(|e| DecodeError::Invalid(e.to_string()))
    }
}

/// The checksum of the first `capacity` bytes of `path` (zeros past its
/// end), with the algorithm new dumps get.
pub fn digest(path: &Path, capacity: u64) -> io::Result<FileDigest> {
    digest_file(path, capacity, Algorithm::CURRENT)
}

/// [`digest`], taking the chunks hashed while the dump was written (see
/// `follow_dump`) when libvirt wrote it in order.
pub fn digest_after(path: &Path, capacity: u64, followed: Option<&Followed>) -> io::Result<FileDigest> {
    let followed = match followed {
        Some(f) if written_in_order(path)? => Some(f),
        _ => None,
    };
    ramsnap_common::checksum::digest_file_after(path, capacity, Algorithm::CURRENT, followed)
}

/// The checksum of a dump libvirt has just written, and where it ends.
///
/// A regular file ends where the dump does. A block device does not: the
/// dump volume is as long as the guest's memory could need, and the dump
/// is often half of it. When libvirt wrote a raw save image and its job
/// says how many bytes of guest memory QEMU's stream carried
/// (`memory_bytes`, libvirt's `memory_processed`), the read stops a little
/// past that: see [`digest_near_stream_end`]. The volume held zeros before
/// the dump (created zeroed, scrubbed after a failed write, never written
/// unmarked: see [`pair_is_clean`]), and QEMU writes nothing past its
/// stream. The value is the whole volume's either way, zeros past the end
/// included.
pub fn digest_dump(
    path: &Path,
    capacity: u64,
    followed: Option<&Followed>,
    memory_bytes: Option<u64>,
) -> io::Result<FileDigest> {
    if let (Some(n), true) = (memory_bytes, is_block_device(path)?) {
        if let Some(start) = stream_start(path)? {
            // A raw save image (stream_start says so): written in order.
            if let Some(d) = digest_near_stream_end(path, capacity, start.saturating_add(n), followed)? {
                return Ok(d);
            }
        }
    }
    digest_after(path, capacity, followed)
}

/// How far past the end of the stream's memory part a dump is read: the
/// device state that follows it (seen: 85 KiB for the test guest) must
/// end well before, so that at least one whole chunk of zeros is read
/// past the data.
const PAST_MEMORY: u64 = 2 * CHUNK as u64;

/// The checksum of a volume that holds zeros past its dump, where the
/// dump's memory part ends at `memory_end` and the device state follows:
/// read up to [`PAST_MEMORY`] past the chunk holding `memory_end`. None
/// (read the whole volume) unless the last chunk read is all zeros, so
/// the figure was not far wrong; or when the volume is no longer than
/// that anyway.
pub fn digest_near_stream_end(
    path: &Path,
    capacity: u64,
    memory_end: u64,
    followed: Option<&Followed>,
) -> io::Result<Option<FileDigest>> {
    let bound = memory_end
        .div_ceil(CHUNK as u64)
        .saturating_mul(CHUNK as u64)
        .saturating_add(PAST_MEMORY);
    if bound >= capacity {
        return Ok(None);
    }
    let d = ramsnap_common::checksum::digest_file_upto(
        path,
        capacity,
        Algorithm::CURRENT,
        followed,
        bound,
        false,
    )?;
    if d.data_end > bound - CHUNK as u64 {
        tracing::warn!(
            path = %path.display(), memory_end, data_end = d.data_end,
            "the dump runs on far past its memory: the whole volume is checksummed"
        );
        return Ok(None);
    }
    tracing::debug!(path = %path.display(), memory_end, data_end = d.data_end, "dump read to its end");
    Ok(Some(d))
}

/// The checksum of a recorded dump as its volume holds it now, for a
/// restore or a verification: reads up to the end of the chunk holding
/// the dump's last byte (`dump_bytes`, as recorded), taking what follows
/// as zeros (see [`ramsnap_common::checksum::digest_file_upto`]). A value
/// computed so matches the recorded one only if the dump had nothing past
/// there, so everything a restore reads of it was read here; a wrong
/// `dump_bytes` can only make it fail to match. The bytes past it are
/// not the dump's: a restore never reads them.
///
/// `beside_restore`: QEMU reads the dump at the same time; the read goes
/// through the page cache, so that the volume is read from the device
/// once (see [`ramsnap_common::checksum::digest_file_upto`]).
pub fn digest_recorded(path: &Path, dump: &DumpRecord, beside_restore: bool) -> io::Result<FileDigest> {
    digest_recorded_upto(path, dump, beside_restore, None)
}

/// [`digest_recorded`] after a restore that [`follow_block_restore`]
/// followed: the chunks it hashed are taken as they are, the rest is read
/// through the page cache.
pub fn digest_recorded_after(
    path: &Path,
    dump: &DumpRecord,
    followed: Option<&Followed>,
) -> io::Result<FileDigest> {
    digest_recorded_upto(path, dump, true, followed)
}

fn digest_recorded_upto(
    path: &Path,
    dump: &DumpRecord,
    through_cache: bool,
    followed: Option<&Followed>,
) -> io::Result<FileDigest> {
    let zeros_from = match dump.dump_bytes {
        0 => u64::MAX,
        n => n.div_ceil(CHUNK as u64).saturating_mul(CHUNK as u64),
    };
    ramsnap_common::checksum::digest_file_upto(
        path,
        dump.capacity,
        dump.checksum.algorithm,
        followed,
        zeros_from,
        through_cache,
    )
}

/// Where QEMU's stream starts in a raw libvirt save image: past libvirt's
/// header (92 bytes: magic, five u32s, 14 unused u32s) and the data it
/// counts (the domain XML, the cookie, padding). None for any other image.
pub fn stream_start(path: &Path) -> io::Result<Option<u64>> {
    Ok(raw_save_data_len(path)?.map(|data_len| SAVE_HEADER_BYTES + u64::from(data_len)))
}

/// The data length in libvirt's save image header when the file is a
/// finished, raw save image (magic, then version, data length, was-running
/// and the image format as native u32s; format 0 is raw); None otherwise.
fn raw_save_data_len(path: &Path) -> io::Result<Option<u32>> {
    let mut head = [0u8; 32];
    let f = File::open(path)?;
    let mut got = 0;
    while got < head.len() {
        let n = (&f).read(&mut head[got..])?;
        if n == 0 {
            return Ok(None);
        }
        got += n;
    }
    let u32_at = |at: usize| u32::from_ne_bytes(head[at..at + 4].try_into().expect("4 bytes"));
    Ok((&head[..16] == SAVE_MAGIC && u32_at(28) == 0).then(|| u32_at(20)))
}

/// The size of libvirt's save image header (`virQEMUSaveHeader`: a
/// 16-byte magic, version, data_len, was_running, compressed (the
/// format), cookieOffset, 14 unused u32s); its data (the domain XML first,
/// NUL-terminated) follows at once.
pub const SAVE_HEADER_BYTES: u64 = 92;

/// A follower's stop flag, set when this is dropped: a follower (which
/// runs until told to stop) stops even when the call that started it is
/// dropped part-way.
pub struct StopOnDrop(pub std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// Hashes a FILE dump's chunks while libvirt writes it, until `stop`.
pub fn follow_dump(path: &Path, capacity: u64, stop: &std::sync::atomic::AtomicBool) -> io::Result<Followed> {
    ramsnap_common::checksum::follow_growing_file(path, capacity, stop, std::time::Duration::from_millis(2))
}

/// Hashes a BLOCK dump's chunks while QEMU writes it, until `stop`. A
/// device does not grow as a file does: how far the dump is written is
/// the position of the writer's file descriptor on the device (QEMU's, or
/// that of libvirt's I/O helper that QEMU's stream goes through; either
/// writes the stream in order), read from `/proc/<pid>/fdinfo`. Where no
/// such process of this host shows a descriptor on the device (another
/// PID namespace), nothing is hashed during the dump and the checksum
/// after reads it all, as before.
pub fn follow_block_dump(
    path: &Path,
    capacity: u64,
    stop: &std::sync::atomic::AtomicBool,
) -> io::Result<Followed> {
    follow_device_user(path, capacity, stop, None)
}

/// How long [`follow_block_restore`] waits for the restore's reader to
/// show before it reads on its own: QEMU starts and takes the device
/// within a few hundred ms.
const READER_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Hashes a BLOCK dump while libvirt's restore reads it, up to where the
/// reader has read (the position of QEMU's descriptor on the device, found
/// as [`follow_block_dump`] finds the writer's): those chunks are in the
/// page cache the restore filled, so the device is read once, where
/// several readers beside the restore made it read at several places at
/// once (on the loop devices here, a restore 1.1-1.8 times virsh's). The
/// dump does not change under a restore: where the reader is only says
/// when to read, never what. If no reader shows within [`READER_WAIT`]
/// (another PID namespace), it reads ahead on its own, as beside.
pub fn follow_block_restore(
    path: &Path,
    capacity: u64,
    stop: &std::sync::atomic::AtomicBool,
) -> io::Result<Followed> {
    follow_device_user(path, capacity, stop, Some(READER_WAIT))
}

/// Follows the descriptors that QEMU or libvirt's I/O helper holds on the
/// block device at `path` (see [`follow_block_dump`]); `alone_after`: how
/// long to wait for one before reading the whole device (a restore: the
/// device's content is final), or never (a dump).
fn follow_device_user(
    path: &Path,
    capacity: u64,
    stop: &std::sync::atomic::AtomicBool,
    alone_after: Option<std::time::Duration>,
) -> io::Result<Followed> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(path)?.rdev();
    let started = std::time::Instant::now();
    let mut user: Vec<PathBuf> = Vec::new();
    let mut seen = false;
    let mut scanned: Option<std::time::Instant> = None;
    // Only ever grows: what QEMU wrote stays written (libvirt rewrites its
    // header at the end through the same description, which moves the
    // position back into chunk 0; chunk 0 is never taken while following).
    let mut known = 0u64;
    ramsnap_common::checksum::follow_written(
        path,
        capacity,
        stop,
        std::time::Duration::from_millis(2),
        &mut |_| {
            if user.is_empty() && scanned.is_none_or(|t| t.elapsed() >= std::time::Duration::from_millis(20))
            {
                scanned = Some(std::time::Instant::now());
                user = user_fds(rdev);
                seen |= !user.is_empty();
            }
            if user.is_empty() {
                if !seen && alone_after.is_some_and(|d| started.elapsed() >= d) {
                    return Ok(Some(capacity));
                }
                return Ok(Some(known));
            }
            // Several descriptors on the device: the least position is
            // below the user's, whichever it is.
            let least = user.iter().map(|i| fd_position(i)).collect::<Option<Vec<u64>>>();
            match least.and_then(|p| p.into_iter().min()) {
                Some(p) => known = known.max(p),
                // Closed: the dump is over; what was known stays.
                None => user.clear(),
            }
            Ok(Some(known))
        },
    )
}

/// The fdinfo files of every descriptor that a QEMU process or libvirt's
/// I/O helper on this host holds on the block device `rdev`.
fn user_fds(rdev: u64) -> Vec<PathBuf> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let pid = p.file_name();
        if !pid
            .to_str()
            .is_some_and(|s| s.bytes().all(|b| b.is_ascii_digit()))
        {
            continue;
        }
        // QEMU, or libvirt's I/O helper (libvirt writes a save image
        // through it where QEMU cannot write the target without blocking).
        let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("qemu") && !comm.starts_with("libvirt_iohelp") {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            // Through the link: the device itself, whatever QEMU's mount
            // namespace calls it.
            let on_it = std::fs::metadata(fd.path())
                .is_ok_and(|m| m.file_type().is_block_device() && m.rdev() == rdev);
            if on_it {
                tracing::debug!(process = comm.trim(), pid = ?pid, "a descriptor on the dump's device");
                out.push(p.path().join("fdinfo").join(fd.file_name()));
            }
        }
    }
    out
}

/// The file position in an fdinfo file (`pos:\t<bytes>`).
fn fd_position(fdinfo: &Path) -> Option<u64> {
    std::fs::read_to_string(fdinfo)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("pos:"))?
        .trim()
        .parse()
        .ok()
}

const SAVE_MAGIC: &[u8; 16] = b"LibvirtQemudSave";

/// True when the file is a libvirt save image whose QEMU stream was
/// written in order: libvirt's header says the raw format.
/// A compressed image goes through a compressor, and the sparse format of
/// newer libvirt (QEMU's mapped-ram) writes pages at fixed offsets: for
/// both the chunks hashed during the dump are not trusted.
pub fn written_in_order(path: &Path) -> io::Result<bool> {
    Ok(raw_save_data_len(path)?.is_some())
}

pub fn is_block_device(path: &Path) -> io::Result<bool> {
    Ok(std::fs::metadata(path)?.file_type().is_block_device())
}

/// The first block of a metadata volume whose dump volume is being
/// written: a document of its own format (never taken for metadata).
pub const IN_PROGRESS_FORMAT: &str = "ramsnap.memory-dump-in-progress";
const MARK_BYTES: usize = 4096;

/// True when the metadata volume's first block reads as zeros: the pair is
/// as the storage service made it (both volumes zeroed) or as a clean-up
/// left it (the dump scrubbed, then the metadata zeroed), so the dump
/// volume reads as zeros too. Every writer of a dump marks the metadata
/// volume first ([`mark_dump_in_progress`]), and a complete dump's metadata
/// starts at the same place. A block device is read with O_DIRECT: another
/// host, or this one before, may have written it through another device
/// node, and no stale cached page may answer.
pub fn pair_is_clean(meta_path: &Path) -> io::Result<bool> {
    let block = is_block_device(meta_path)?;
    let mut storage = vec![0u8; MARK_BYTES * 2];
    let start = storage.as_ptr().align_offset(MARK_BYTES);
    let buf = &mut storage[start..start + MARK_BYTES];
    let f = if block {
        use std::os::unix::fs::OpenOptionsExt;
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(meta_path)?
    } else {
        File::open(meta_path)?
    };
    let mut got = 0;
    while got < MARK_BYTES {
        let n = std::os::unix::fs::FileExt::read_at(&f, &mut buf[got..], got as u64)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(buf[..got].iter().all(|&b| b == 0))
}

/// Marks the pair as being written, durably, before libvirt writes the
/// dump: a later attempt on the same pair then scrubs the dump first.
/// Within the volume's `capacity`.
pub fn mark_dump_in_progress(
    meta_path: &Path,
    capacity: u64,
    vm_id: Uuid,
    snapshot_id: Uuid,
) -> io::Result<()> {
    let mut doc = serde_json::to_vec(&serde_json::json!({
        "format": IN_PROGRESS_FORMAT,
        "version": 1,
        "vm_id": vm_id,
        "snapshot_id": snapshot_id,
    }))
    .expect("serializes");
    doc.resize(MARK_BYTES.min(capacity as usize).max(1), 0);
    write_volume(meta_path, &doc)
}

// BLKZEROOUT = _IO(0x12, 127)
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// Makes the dump volume read as zeros before a dump, so that its checksum
/// is well-defined: a file is truncated to nothing, a block device has its
/// first `capacity` bytes zeroed (BLKZEROOUT, or plain writes where the
/// device cannot).
/// The (vm, snapshot) of the in-progress mark `mark_dump_in_progress`
/// wrote, if the metadata volume holds one (None: zeros, a recorded
/// document, or anything else).
pub fn in_progress_mark(meta_path: &Path, capacity: u64) -> io::Result<Option<(Uuid, Uuid)>> {
    let bytes = read_volume(meta_path, (MARK_BYTES as u64).min(capacity))?;
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(&bytes[..end]) else {
        return Ok(None);
    };
    if doc["format"].as_str() != Some(IN_PROGRESS_FORMAT) {
        return Ok(None);
    }
    let id = |k: &str| doc[k].as_str().and_then(|s| Uuid::parse_str(s).ok());
    Ok(id("vm_id").zip(id("snapshot_id")))
}

pub fn scrub_dump(path: &Path, capacity: u64) -> io::Result<()> {
    if !is_block_device(path)? {
        let f = OpenOptions::new().write(true).open(path)?;
        f.set_len(0)?;
        return f.sync_all();
    }
    let f = OpenOptions::new().write(true).open(path)?;
    let len = device_len(&f)?.min(capacity);
    let range: [u64; 2] = [0, len];
    let r = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&f), BLKZEROOUT, range.as_ptr()) };
    if r == 0 {
        return Ok(());
    }
    let mut f = f;
    let zeros = vec![0u8; 4 << 20];
    let mut done = 0u64;
    while done < len {
        let n = ((len - done) as usize).min(zeros.len());
        f.write_all(&zeros[..n])?;
        done += n as u64;
    }
    f.sync_all()
}

/// Writes the encoded metadata at the start of the volume.
pub fn write_volume(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new().write(true).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Reads the first `capacity` bytes of the metadata volume.
pub fn read_volume(path: &Path, capacity: u64) -> io::Result<Vec<u8>> {
    let f = File::open(path)?;
    let mut out = Vec::new();
    f.take(capacity.min(MAX_DOCUMENT)).read_to_end(&mut out)?;
    Ok(out)
}

/// Giving a memory to another VM (a fork): libvirt's save header holds the
/// domain XML, whose name and UUID carry the VM's id; libvirt refuses to
/// restore an image under another name or UUID. A header's XML written in
/// place with the other id (same length, so the cookie and QEMU's stream do
/// not move) makes the image the other VM's.
///
/// The header of a finished, raw libvirt save image, and the data it counts
/// (domain XML, cookie, padding): the bytes that name the domain. None for
/// any other image.
pub fn read_save_head(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let Some(data_len) = raw_save_data_len(path)? else {
        return Ok(None);
    };
    let len = SAVE_HEADER_BYTES + u64::from(data_len);
    let mut head = Vec::with_capacity(len as usize);
    File::open(path)?.take(len).read_to_end(&mut head)?;
    Ok((head.len() as u64 == len).then_some(head))
}

/// Whose the head is: the VM `from`'s, or already `to`'s; None when it names
/// neither or both (it is not this VM's image, or a damaged one).
pub fn head_owner(head: &[u8], from: Uuid, to: Uuid) -> Option<Uuid> {
    let has = |id: Uuid| contains(head, id.to_string().as_bytes());
    match (has(from), has(to)) {
        (true, false) => Some(from),
        (false, true) => Some(to),
        _ => None,
    }
}

/// `head` with every mention of `from`'s id replaced by `to`'s (the same
/// length: nothing moves).
pub fn replace_id(head: &[u8], from: Uuid, to: Uuid) -> Vec<u8> {
    let (from, to) = (from.to_string(), to.to_string());
    let (from, to) = (from.as_bytes(), to.as_bytes());
    let mut out = head.to_vec();
    let mut at = 0;
    while let Some(i) = find(&out[at..], from) {
        out[at + i..at + i + from.len()].copy_from_slice(to);
        at += i + from.len();
    }
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle).is_some()
}

/// Writes `head` over the start of the dump, durably.
pub fn write_head(path: &Path, head: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = OpenOptions::new().write(true).open(path)?;
    f.write_all_at(head, 0)?;
    f.sync_data()
}

/// The checksum `dump` records, computed over the dump as if its first
/// `head.len()` bytes were `head` (in order, on one thread): to verify a
/// dump whose header was already rewritten against the value recorded
/// before.
pub fn digest_with_head(path: &Path, dump: &DumpRecord, head: &[u8]) -> io::Result<Checksum> {
    let f = File::open(path)?;
    let zeros_from = match dump.dump_bytes {
        0 => u64::MAX,
        n => n.div_ceil(CHUNK as u64).saturating_mul(CHUNK as u64),
    };
    let readable = device_len(&f)?.min(dump.capacity).min(zeros_from);
    let mut hasher = ramsnap_common::checksum::StreamHasher::new(dump.checksum.algorithm, dump.capacity);
    let mut reader = io::BufReader::with_capacity(CHUNK, f.take(readable));
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0usize;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let block = &mut buf[..n];
        if pos < head.len() {
            let k = (head.len() - pos).min(n);
            block[..k].copy_from_slice(&head[pos..pos + k]);
        }
        hasher.update(block);
        pos += n;
    }
    Ok(hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The position the BLOCK follower reads is the writer's: after each
    /// write, what /proc says of this process's own descriptor.
    #[test]
    fn fd_position_is_how_far_the_descriptor_wrote() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let mut f = std::fs::File::create(dir.path().join("dump")).unwrap();
        let info = PathBuf::from(format!("/proc/self/fdinfo/{}", f.as_raw_fd()));
        assert_eq!(fd_position(&info), Some(0));
        f.write_all(&[7u8; 12345]).unwrap();
        assert_eq!(fd_position(&info), Some(12345));
        assert_eq!(fd_position(Path::new("/proc/self/fdinfo/not-a-descriptor")), None);
    }

    fn vref() -> VolumeRef {
        VolumeRef {
            domain: Uuid::new_v4(),
            image: Uuid::new_v4(),
            volume: Uuid::new_v4(),
        }
    }

    fn sample() -> MemoryMetadata {
        MemoryMetadata {
            format: FORMAT.into(),
            version: VERSION,
            vm_id: Uuid::new_v4(),
            snapshot_id: Uuid::new_v4(),
            created_at: 1_700_000_000,
            mode: SnapshotMode::Live,
            disks: vec![DiskRecord {
                current: vref(),
                overlay: vref(),
            }],
            dump: DumpRecord {
                volume: vref(),
                capacity: 1 << 20,
                dump_bytes: 1000,
                checksum: format!("blake3-4m:{}", "ab".repeat(32)).parse().unwrap(),
            },
            domain_xml: "<domain type='qemu'>\0</domain>".into(),
        }
    }

    #[test]
    fn round_trips_through_a_padded_volume() {
        let m = sample();
        let bytes = m.encode(1 << 20).unwrap();
        assert_eq!(bytes.len(), 1 << 20);
        assert_eq!(MemoryMetadata::decode(&bytes).unwrap(), m);
        assert!(m.encode(100).is_none(), "a document that does not fit is refused");
        assert_eq!(m.encode(1 << 40).unwrap().len() as u64, MAX_DOCUMENT);
    }

    #[test]
    fn refuses_foreign_empty_and_newer_documents() {
        assert!(matches!(
            MemoryMetadata::decode(&[0; 64]),
            Err(DecodeError::Invalid(_))
        ));
        assert!(matches!(
            MemoryMetadata::decode(b"{\"format\":\"x\",\"version\":1}"),
            Err(DecodeError::Invalid(_))
        ));
        assert!(matches!(
            MemoryMetadata::decode(b"garbage"),
            Err(DecodeError::Invalid(_))
        ));
        let newer = format!("{{\"format\":\"{FORMAT}\",\"version\":3}}");
        assert_eq!(
            MemoryMetadata::decode(newer.as_bytes()),
            Err(DecodeError::Version(3))
        );
        // Unknown fields are ignored.
        let mut v: serde_json::Value = serde_json::to_value(sample()).unwrap();
        v["future_field"] = serde_json::json!(42);
        assert!(MemoryMetadata::decode(v.to_string().as_bytes()).is_ok());
    }

    #[test]
    fn version_1_documents_still_read() {
        let m = sample();
        let mut v: serde_json::Value = serde_json::to_value(&m).unwrap();
        assert_eq!(v["dump"]["checksum"], m.dump.checksum.to_string().as_str());
        assert!(
            v["dump"].get("sha256").is_none(),
            "version 2 writes `checksum` only"
        );
        // What version 1 wrote: a bare hex SHA-256 under `sha256`.
        let hex = "cd".repeat(32);
        v["version"] = serde_json::json!(1);
        v["dump"].as_object_mut().unwrap().remove("checksum");
        v["dump"]["sha256"] = serde_json::json!(hex);
        let old = MemoryMetadata::decode(v.to_string().as_bytes()).unwrap();
        assert_eq!(old.version, 1);
        assert_eq!(old.dump.checksum.to_string(), format!("sha256:{hex}"));
        // A document without a checksum, or with a malformed one, is not metadata.
        v["dump"]["sha256"] = serde_json::json!("cd");
        assert!(matches!(
            MemoryMetadata::decode(v.to_string().as_bytes()),
            Err(DecodeError::Invalid(_))
        ));
        v["dump"].as_object_mut().unwrap().remove("sha256");
        assert!(matches!(
            MemoryMetadata::decode(v.to_string().as_bytes()),
            Err(DecodeError::Invalid(_))
        ));
        v["dump"]["checksum"] = serde_json::json!(format!("md5:{hex}"));
        assert!(matches!(
            MemoryMetadata::decode(v.to_string().as_bytes()),
            Err(DecodeError::Invalid(_))
        ));
    }

    #[test]
    fn only_a_raw_libvirt_save_image_counts_as_written_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dump");
        let header = |magic: &[u8; 16], format: u32| {
            let mut h = magic.to_vec();
            for v in [2u32, 1000, 1, format, 0] {
                h.extend_from_slice(&v.to_ne_bytes());
            }
            h
        };
        std::fs::write(&p, header(SAVE_MAGIC, 0)).unwrap();
        assert!(written_in_order(&p).unwrap());
        // Compressed (gzip is 1) or sparse: no.
        for format in [1, 5] {
            std::fs::write(&p, header(SAVE_MAGIC, format)).unwrap();
            assert!(!written_in_order(&p).unwrap());
        }
        // Not yet finished (libvirt writes "LibvirtQemudPart" first), short, empty.
        std::fs::write(&p, header(b"LibvirtQemudPart", 0)).unwrap();
        assert!(!written_in_order(&p).unwrap());
        std::fs::write(&p, &SAVE_MAGIC[..]).unwrap();
        assert!(!written_in_order(&p).unwrap());
        std::fs::write(&p, b"").unwrap();
        assert!(!written_in_order(&p).unwrap());
    }

    /// A save image given to another VM: its header names the other id
    /// (nothing moves: the same length), its checksum changes, and the
    /// value recorded before can still be checked on the rewritten dump by
    /// reading it with the original header, for both algorithms.
    #[test]
    fn a_save_image_is_given_to_another_vm_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dump");
        let (from, to, other) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let xml = format!("<domain><name>ramsnap-{from}</name><uuid>{from}</uuid><on_poweroff>destroy</on_poweroff></domain>");
        let data_len = 4096u32;
        let mut bytes = SAVE_MAGIC.to_vec();
        for v in [2u32, data_len, 1, 0, 0] {
            bytes.extend_from_slice(&v.to_ne_bytes());
        }
        bytes.resize(92, 0);
        bytes.extend_from_slice(xml.as_bytes());
        bytes.resize(92 + data_len as usize, 0);
        // QEMU's stream: two chunks and a bit, then zeros.
        bytes.extend((0..2 * CHUNK + 777).map(|i| (i % 253) as u8 | 1));
        let cap = 6 * CHUNK as u64;
        std::fs::write(&p, &bytes).unwrap();

        for algorithm in [Algorithm::Blake3Chunks, Algorithm::Sha256] {
            std::fs::write(&p, &bytes).unwrap();
            let before = digest_file(&p, cap, algorithm).unwrap();
            let record = DumpRecord {
                volume: vref(),
                capacity: cap,
                dump_bytes: before.data_end,
                checksum: before.checksum,
            };
            let head = read_save_head(&p).unwrap().unwrap();
            assert_eq!(head.len(), 92 + data_len as usize);
            assert_eq!(head_owner(&head, from, to), Some(from));
            assert_eq!(head_owner(&head, other, to), None, "names neither");
            let given = replace_id(&head, from, to);
            assert_eq!(given.len(), head.len());
            assert_eq!(head_owner(&given, from, to), Some(to));
            assert_eq!(replace_id(&given, to, from), head);
            let text = String::from_utf8_lossy(&given[92..]).to_string();
            assert!(
                text.contains(&format!("<name>ramsnap-{to}</name><uuid>{to}</uuid>")),
                "{text}"
            );

            // Read with its own header, the dump has its recorded value.
            assert_eq!(digest_with_head(&p, &record, &head).unwrap(), before.checksum);
            write_head(&p, &given).unwrap();
            assert_eq!(read_save_head(&p).unwrap().unwrap(), given);
            let after = digest_recorded(&p, &record, false).unwrap().checksum;
            assert_ne!(after, before.checksum);
            // The rewritten dump read with the original header: the old value.
            assert_eq!(digest_with_head(&p, &record, &head).unwrap(), before.checksum);
            assert_eq!(digest_with_head(&p, &record, &given).unwrap(), after);
            // Anything else in the stream still counts.
            let mut flipped = std::fs::read(&p).unwrap();
            flipped[96 + data_len as usize + CHUNK + 5] ^= 0x40;
            std::fs::write(&p, &flipped).unwrap();
            assert_ne!(digest_with_head(&p, &record, &head).unwrap(), before.checksum);
        }
        // Not a raw save image: nothing to give.
        std::fs::write(&p, b"QEVM").unwrap();
        assert_eq!(read_save_head(&p).unwrap(), None);
    }

    #[test]
    fn a_raw_save_image_says_where_its_stream_starts() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dump");
        let header = |magic: &[u8; 16], data_len: u32, format: u32| {
            let mut h = magic.to_vec();
            for v in [2u32, data_len, 1, format, 0] {
                h.extend_from_slice(&v.to_ne_bytes());
            }
            h.resize(92, 0);
            h
        };
        std::fs::write(&p, header(SAVE_MAGIC, 8096, 0)).unwrap();
        assert_eq!(stream_start(&p).unwrap(), Some(92 + 8096));
        for (magic, format) in [(SAVE_MAGIC, 1), (b"LibvirtQemudPart", 0)] {
            std::fs::write(&p, header(magic, 8096, format)).unwrap();
            assert_eq!(stream_start(&p).unwrap(), None);
        }
        std::fs::write(&p, b"LibvirtQemudSave").unwrap();
        assert_eq!(stream_start(&p).unwrap(), None);
    }

    /// The read that stops a little past a dump's memory part: the value
    /// is the whole volume's when the volume holds zeros past the dump
    /// (the device state past the memory part included); a dump that runs
    /// on into the last chunk read (the figure was far wrong) gives None,
    /// so the caller reads everything; a restore's read, bound by the
    /// recorded dump_bytes, gives the same value.
    #[test]
    fn a_dump_read_near_its_end_has_the_whole_volumes_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dump");
        let chunk = CHUNK as u64;
        let cap = 10 * chunk;
        // Memory up to 2 chunks + 12,345; device state for 90 KB more.
        let memory_end = 2 * chunk + 12_345;
        let end = memory_end + 90_000;
        let mut bytes: Vec<u8> = (0..end).map(|i| (i % 251) as u8 | 1).collect();
        bytes.resize(cap as usize, 0);
        std::fs::write(&p, &bytes).unwrap();
        let full = digest(&p, cap).unwrap();
        let d = digest_near_stream_end(&p, cap, memory_end, None)
            .unwrap()
            .unwrap();
        assert_eq!(d.checksum, full.checksum);
        assert_eq!(d.data_end, end);
        let record = DumpRecord {
            volume: vref(),
            capacity: cap,
            dump_bytes: d.data_end,
            checksum: d.checksum,
        };
        assert_eq!(
            digest_recorded(&p, &record, false).unwrap().checksum,
            full.checksum
        );

        // A figure somewhat short still gives the whole volume's value; one
        // far short of the dump (its bytes reach the last chunk read) gives
        // None, and the whole volume is to be read.
        let d = digest_near_stream_end(&p, cap, chunk + 1, None).unwrap().unwrap();
        assert_eq!((d.checksum, d.data_end), (full.checksum, end));
        for short in [chunk - 1, 1] {
            assert_eq!(
                digest_near_stream_end(&p, cap, short, None).unwrap(),
                None,
                "{short}"
            );
        }
        // A volume hardly longer than the dump is read whole.
        assert_eq!(
            digest_near_stream_end(&p, 5 * chunk, memory_end, None).unwrap(),
            None
        );

        // Bytes far past the dump are no part of it: neither read nor
        // counted, by the dump's checksum or by a restore's.
        bytes[9 * CHUNK] = 0xAB;
        std::fs::write(&p, &bytes).unwrap();
        assert_eq!(
            digest_near_stream_end(&p, cap, memory_end, None)
                .unwrap()
                .unwrap()
                .checksum,
            full.checksum
        );
        assert_eq!(
            digest_recorded(&p, &record, false).unwrap().checksum,
            full.checksum
        );
        assert_ne!(digest(&p, cap).unwrap().checksum, full.checksum);
        // A flipped byte in the dump, or a recorded dump_bytes cut short,
        // fails to match.
        bytes[9 * CHUNK] = 0;
        bytes[CHUNK + 5] ^= 0x40;
        std::fs::write(&p, &bytes).unwrap();
        assert_ne!(
            digest_recorded(&p, &record, false).unwrap().checksum,
            full.checksum
        );
        bytes[CHUNK + 5] ^= 0x40;
        std::fs::write(&p, &bytes).unwrap();
        let cut = DumpRecord {
            dump_bytes: chunk,
            ..record.clone()
        };
        assert_ne!(digest_recorded(&p, &cut, false).unwrap().checksum, full.checksum);
        // No dump_bytes recorded: the whole volume.
        let none = DumpRecord {
            dump_bytes: 0,
            ..record
        };
        assert_eq!(digest_recorded(&p, &none, true).unwrap().checksum, full.checksum);
    }

    #[test]
    fn scrub_empties_a_file_dump() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dump");
        std::fs::write(&p, b"old dump").unwrap();
        scrub_dump(&p, 1 << 20).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 0);
    }

    #[test]
    fn a_pair_is_clean_until_marked_and_again_once_zeroed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("meta");
        std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
        assert!(pair_is_clean(&p).unwrap(), "a new, zeroed volume");
        let (vm, snap) = (Uuid::new_v4(), Uuid::new_v4());
        mark_dump_in_progress(&p, 1 << 20, vm, snap).unwrap();
        assert!(!pair_is_clean(&p).unwrap());
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20, "within the volume");
        // The mark is never taken for metadata.
        let bytes = read_volume(&p, 1 << 20).unwrap();
        match MemoryMetadata::decode(&bytes) {
            Err(DecodeError::Invalid(r)) => assert!(r.contains(IN_PROGRESS_FORMAT), "{r}"),
            other => panic!("{other:?}"),
        }
        // A byte anywhere in the first block counts.
        write_volume(&p, &vec![0u8; 1 << 20]).unwrap();
        assert!(pair_is_clean(&p).unwrap());
        std::os::unix::fs::FileExt::write_at(
            &std::fs::OpenOptions::new().write(true).open(&p).unwrap(),
            &[1],
            4095,
        )
        .unwrap();
        assert!(!pair_is_clean(&p).unwrap());
        // A tiny volume takes a mark cut to its size.
        let small = dir.path().join("small");
        std::fs::File::create(&small).unwrap().set_len(16).unwrap();
        mark_dump_in_progress(&small, 16, vm, snap).unwrap();
        assert_eq!(std::fs::metadata(&small).unwrap().len(), 16);
        assert!(!pair_is_clean(&small).unwrap());
    }
}
