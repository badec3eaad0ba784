//! The memory metadata volume's format (versioned JSON, NUL-padded to the
//! volume's capacity) and the dump checksum.
//!
//! Checksum: SHA-256 of the dump volume's first `capacity` bytes, where
//! bytes past a file's end count as zeros. A FILE dump shrinks to the dump's
//! size (libvirt opens it with O_TRUNC), a BLOCK dump does not (it is zeroed
//! before the dump), and a storage copy copies exactly `capacity` bytes,
//! zero-filling past the end: the checksum is the same on every copy.
use crate::model::{SnapshotMode, VolumeRef};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use uuid::Uuid;

pub const FORMAT: &str = "ramsnap.memory-metadata";
pub const VERSION: u32 = 1;
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
pub struct DumpRecord {
    pub volume: VolumeRef,
    /// The dump volume's capacity: the checksum covers this many bytes.
    pub capacity: u64,
    pub dump_bytes: u64,
    /// Hex SHA-256.
    pub sha256: String,
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

/// The checksum of a dump and where its data ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpDigest {
    pub sha256: String,
    /// End of the last non-zero byte within `capacity`: the dump's size on
    /// a block device, where it cannot be told from the file length.
    pub data_end: u64,
    /// Length of the file (or device).
    pub len: u64,
}

const CHUNK: usize = 4 << 20;

static ZEROS: [u8; 4096] = [0; 4096];

/// Index of the last non-zero byte. Compares whole 4 KiB blocks with a zero
/// block (memcmp, fast in any build profile), then bytes in the last
/// non-zero block only.
fn last_nonzero(buf: &[u8]) -> Option<usize> {
    let block = buf.chunks(4096).rposition(|b| b != &ZEROS[..b.len()])?;
    let start = block * 4096;
    let end = (start + 4096).min(buf.len());
    buf[start..end].iter().rposition(|&b| b != 0).map(|i| start + i)
}

/// SHA-256 of the first `capacity` bytes of `path`, zeros past its end.
pub fn digest(path: &Path, capacity: u64) -> io::Result<DumpDigest> {
    let f = File::open(path)?;
    let len = device_len(&f)?;
    let readable = len.min(capacity);
    let mut hasher = Sha256::new();
    let mut data_end = 0u64;
    let done = {
        let mut take = |offset: u64, chunk: &[u8]| {
            if let Some(i) = last_nonzero(chunk) {
                data_end = offset + i as u64 + 1;
            }
            hasher.update(chunk);
        };
        if f.metadata()?.file_type().is_block_device() {
            // The dump just written is in the page cache: read it buffered up
            // to the first chunk of zeros; the zeroed rest goes faster with
            // direct reads. Where the switch happens changes the speed only.
            let data = read_sequential(&f, 0, readable, true, &mut take)?;
            match read_parallel_direct(path, data, readable, &mut take) {
                Ok(end) => end,
                Err(_) => read_sequential(&f, data, readable, false, &mut take)?,
            }
        } else {
            read_sequential(&f, 0, readable, false, &mut take)?
        }
    };
    let zeros = vec![0u8; CHUNK];
    let mut done = done;
    while done < capacity {
        let n = ((capacity - done) as usize).min(CHUNK);
        hasher.update(&zeros[..n]);
        done += n as u64;
    }
    Ok(DumpDigest {
        sha256: hex(&hasher.finalize()),
        data_end,
        len,
    })
}

/// Feeds `[start, end)` of the file to `take` in order; returns where it
/// stopped: `end`, the file's end, or with `until_zeros` after the first
/// chunk of zeros.
fn read_sequential(
    f: &File,
    start: u64,
    end: u64,
    until_zeros: bool,
    take: &mut dyn FnMut(u64, &[u8]),
) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; CHUNK];
    let mut done = start;
    while done < end {
        let want = ((end - done) as usize).min(CHUNK);
        let n = f.read_at(&mut buf[..want], done)?;
        if n == 0 {
            break;
        }
        take(done, &buf[..n]);
        done += n as u64;
        if until_zeros && n == CHUNK && last_nonzero(&buf[..n]).is_none() {
            break;
        }
    }
    Ok(done)
}

const READERS: usize = 4;
const BUFFERS: usize = 2 * READERS;
const ALIGN: usize = 4096;

/// Feeds `[start, len)` of a block device to `take` in order, read by several
/// O_DIRECT readers: one buffered reader gets about 100-200 MB/s through
/// loop devices, four direct ones about 1 GB/s. A fixed pool of buffers
/// bounds the memory; a reader takes a buffer before it takes the next
/// chunk number, so the lowest missing chunk always has a buffer.
fn read_parallel_direct(
    path: &Path,
    start: u64,
    len: u64,
    take: &mut dyn FnMut(u64, &[u8]),
) -> io::Result<u64> {
    use std::collections::BTreeMap;
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{mpsc, Mutex};

    if !start.is_multiple_of(ALIGN as u64) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "unaligned start"));
    }
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let chunks = (len.saturating_sub(start)).div_ceil(CHUNK as u64);
    let next = AtomicU64::new(0);
    let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
    for _ in 0..BUFFERS {
        let _ = free_tx.send(vec![0u8; CHUNK + ALIGN]);
    }
    let free_rx = Mutex::new(free_rx);
    let (full_tx, full_rx) = mpsc::channel::<io::Result<(u64, Vec<u8>, usize)>>();
    std::thread::scope(|scope| {
        for _ in 0..READERS {
            let (f, next, free_rx, full_tx) = (&f, &next, &free_rx, full_tx.clone());
            scope.spawn(move || loop {
                let Ok(mut buf) = free_rx.lock().expect("buffer pool").recv() else {
                    return;
                };
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= chunks {
                    return;
                }
                let offset = start + i * CHUNK as u64;
                let want = ((len - offset) as usize).min(CHUNK);
                let start = buf.as_ptr().align_offset(ALIGN);
                // O_DIRECT wants whole sectors: round the read up, use `want`.
                let padded = want.div_ceil(512) * 512;
                let r = (|| {
                    let mut got = 0;
                    while got < want {
                        let n = f.read_at(&mut buf[start + got..start + padded], offset + got as u64)?;
                        if n == 0 {
                            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "device ended early"));
                        }
                        got += n;
                    }
                    Ok(())
                })();
                let failed = r.is_err();
                if full_tx.send(r.map(|()| (i, buf, want))).is_err() || failed {
                    return;
                }
            });
        }
        drop(full_tx);
        let mut pending: BTreeMap<u64, (Vec<u8>, usize)> = BTreeMap::new();
        let mut want_next = 0u64;
        let mut done = start;
        while want_next < chunks {
            let (i, buf, n) = match full_rx.recv() {
                Ok(r) => r?,
                Err(_) => return Err(io::Error::other("a reader stopped")),
            };
            pending.insert(i, (buf, n));
            while let Some((buf, n)) = pending.remove(&want_next) {
                let start = buf.as_ptr().align_offset(ALIGN);
                take(done, &buf[start..start + n]);
                done += n as u64;
                want_next += 1;
                let _ = free_tx.send(buf);
            }
        }
        drop(free_tx);
        Ok(done)
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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

pub fn is_block_device(path: &Path) -> io::Result<bool> {
    Ok(std::fs::metadata(path)?.file_type().is_block_device())
}

// BLKZEROOUT = _IO(0x12, 127)
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// Makes the dump volume read as zeros before a dump, so that its checksum
/// is well-defined: a file is truncated to nothing, a block device has its
/// first `capacity` bytes zeroed (BLKZEROOUT, or plain writes where the
/// device cannot).
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
    let zeros = vec![0u8; CHUNK];
    let mut done = 0u64;
    while done < len {
        let n = ((len - done) as usize).min(CHUNK);
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

#[cfg(test)]
mod tests {
    use super::*;

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
                sha256: "ab".repeat(32),
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
        let newer = format!("{{\"format\":\"{FORMAT}\",\"version\":2}}");
        assert_eq!(
            MemoryMetadata::decode(newer.as_bytes()),
            Err(DecodeError::Version(2))
        );
        // Unknown fields in version 1 are ignored.
        let mut v: serde_json::Value = serde_json::to_value(sample()).unwrap();
        v["future_field"] = serde_json::json!(42);
        assert!(MemoryMetadata::decode(v.to_string().as_bytes()).is_ok());
    }

    #[test]
    fn checksum_counts_bytes_past_the_end_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        let long = dir.path().join("long");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8 + 1).collect();
        std::fs::write(&short, &data).unwrap();
        let mut padded = data.clone();
        padded.resize(9 << 20, 0);
        std::fs::write(&long, &padded).unwrap();
        let cap = 8 << 20;
        let a = digest(&short, cap).unwrap();
        let b = digest(&long, cap).unwrap();
        assert_eq!(a.sha256, b.sha256, "a file and its zero-padded copy hash alike");
        assert_eq!(a.data_end, 100_000);
        assert_eq!(b.data_end, 100_000);
        let mut hasher = Sha256::new();
        hasher.update(&padded[..cap as usize]);
        assert_eq!(a.sha256, hex(&hasher.finalize()));
        // One changed byte changes the checksum.
        padded[5] ^= 1;
        std::fs::write(&long, &padded).unwrap();
        assert_ne!(digest(&long, cap).unwrap().sha256, a.sha256);
    }

    #[test]
    fn parallel_direct_reads_deliver_every_chunk_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("data");
        // Several chunks, and a tail that is not a whole chunk.
        let data: Vec<u8> = (0..(3 * CHUNK + 8192) as u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let mut got = Vec::new();
        let r = read_parallel_direct(&p, 0, data.len() as u64, &mut |off, c| {
            assert_eq!(off as usize, got.len());
            got.extend_from_slice(c);
        });
        match r {
            Ok(n) => {
                assert_eq!(n as usize, data.len());
                assert!(got == data, "the chunks came out of order or wrong");
            }
            // A file system without O_DIRECT (tmpfs): nothing to check here.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn scrub_empties_a_file_dump() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dump");
        std::fs::write(&p, b"old dump").unwrap();
        scrub_dump(&p, 1 << 20).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 0);
        assert_eq!(last_nonzero(&[0, 0, 3, 0]), Some(2));
        assert_eq!(last_nonzero(&[0; 9000]), None);
    }
}
