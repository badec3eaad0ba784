//! Moving a volume's data. RAW to RAW is done here: a reader and a writer
//! thread overlap I/O; holes in the source (SEEK_DATA/SEEK_HOLE) and zero
//! blocks are not written to a target that already reads as zeros, and are
//! zeroed cheaply (BLKZEROOUT, fallocate) on one that does not, such as a
//! fresh LV. Anything involving qcow2 or a backing chain goes through
//! `qemu-img convert`, which collapses the chain, or, for a target that has
//! a backing file of its own ([`CopyJob::target_backing`]), copies only the
//! source's top layer.
use crate::error::{Result, StorageError};
use crate::model::Format;
use ramsnap_common::checksum::{self, Checksum, ChunkHasher};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;

/// Unit of zero detection: runs of zero blocks this size are skipped.
const BLOCK: usize = 64 * 1024;
/// Unit of I/O between the reader and the writer.
const CHUNK: usize = 8 * 1024 * 1024;
/// Reader threads.
const READERS: usize = 4;

#[derive(Debug, Clone)]
pub struct CopyJob {
    pub source: PathBuf,
    pub source_format: Format,
    /// The source has a backing chain (which qemu-img collapses).
    pub source_has_parent: bool,
    pub target: PathBuf,
    pub target_format: Format,
    /// The target was just created and reads as zeros everywhere.
    pub target_reads_zero: bool,
    /// The target is a qcow2 overlay whose backing file (a copy of the
    /// source's parent) is already in its header: only what the source's
    /// top layer allocates is written, the rest shows through from below.
    pub target_backing: Option<Backing>,
    /// Virtual size to copy.
    pub size: u64,
    /// Also compute the `blake3-4m` checksum of the `size` bytes copied
    /// (RAW to RAW only), from the bytes the readers pass to the writer.
    pub checksum: bool,
}

/// A target's backing file, as its qcow2 header names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backing {
    pub name: String,
    pub format: Format,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopyStats {
    /// Bytes of data written to the target.
    pub data_bytes: u64,
    /// Bytes recognised as zero (holes or zero blocks).
    pub zero_bytes: u64,
    /// With [`CopyJob::checksum`]: the copied bytes' checksum.
    pub checksum: Option<Checksum>,
    /// How long the data took to read and write (the RAW copy), and then
    /// to flush to the target's storage: where a slow copy spent its time.
    pub transfer_ms: u64,
    pub flush_ms: u64,
}

/// Runs the copy, reporting (processed, total) bytes as it goes.
pub fn run(job: &CopyJob, progress: &mut (dyn FnMut(u64, u64) + Send)) -> Result<CopyStats> {
    let native = job.source_format == Format::Raw
        && job.target_format == Format::Raw
        && !job.source_has_parent
        && job.target_backing.is_none();
    if native {
        copy_raw(job, progress)
    } else if job.checksum {
        Err(StorageError::invalid(
            "checksum_algorithm",
            "a checksum is computed on the copy of a RAW volume without a parent only",
        ))
    } else {
        qemu_img_convert(job, progress)
    }
}

/// Alignment for direct I/O on block devices.
const ALIGN: usize = 4096;

/// A [`CHUNK`]-sized buffer aligned for O_DIRECT.
struct Buf(std::ptr::NonNull<u8>);

// SAFETY: Buf owns its allocation exclusively.
unsafe impl Send for Buf {}

impl Buf {
    fn layout() -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(CHUNK, ALIGN).expect("valid layout")
    }

    fn new() -> Buf {
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(Self::layout()) };
        Buf(std::ptr::NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(Self::layout())))
    }
}

impl std::ops::Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: CHUNK bytes were allocated and initialized.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr(), CHUNK) }
    }
}

impl std::ops::DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_ptr(), CHUNK) }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        // SAFETY: allocated in Buf::new with the same layout.
        unsafe { std::alloc::dealloc(self.0.as_ptr(), Self::layout()) }
    }
}

/// Opens a file for the copy: block devices with O_DIRECT, since buffered
/// I/O on (loop) block devices goes through one more page cache and is
/// several times slower; files buffered, for the kernel's readahead.
fn open(path: &Path, write: bool) -> Result<(File, bool)> {
    use std::os::unix::fs::OpenOptionsExt;
    let is_block = std::fs::metadata(path)?.file_type().is_block_device();
    let mut o = OpenOptions::new();
    o.read(!write).write(write);
    if is_block {
        o.custom_flags(libc::O_DIRECT);
    }
    Ok((o.open(path)?, is_block))
}

fn aligned(offset: u64, len: usize) -> bool {
    offset.is_multiple_of(ALIGN as u64) && len.is_multiple_of(ALIGN)
}

enum Piece {
    Data { offset: u64, buf: Buf, len: usize },
    Zero { offset: u64, len: u64 },
}

fn copy_raw(job: &CopyJob, progress: &mut (dyn FnMut(u64, u64) + Send)) -> Result<CopyStats> {
    let (src, _) = open(&job.source, false)?;
    let (dst, dst_is_block) = open(&job.target, true)?;
    // Unaligned pieces (a tail) cannot go through O_DIRECT.
    let dst_buffered = OpenOptions::new().write(true).open(&job.target)?;
    let size = job.size;

    let (tx, rx) = mpsc::sync_channel::<Piece>(2 * READERS);
    let (recycle_tx, recycle_rx) = mpsc::channel::<Buf>();
    let mut stats = CopyStats::default();
    let hasher = job.checksum.then(|| ChunkHasher::new(size));

    let started = std::time::Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let hasher = hasher.as_ref();
        let reader = s.spawn(move || read_pieces(&src, size, tx, recycle_rx, hasher));
        let mut done = 0u64;
        let mut write_err = None;
        for piece in rx.iter() {
            let r = match piece {
                Piece::Data { offset, buf, len } => {
                    let r = if !dst_is_block || aligned(offset, len) {
                        dst.write_all_at(&buf[..len], offset)
                    } else {
                        dst_buffered.write_all_at(&buf[..len], offset)
                    };
                    stats.data_bytes += len as u64;
                    done += len as u64;
                    let _ = recycle_tx.send(buf);
                    r.map_err(StorageError::from)
                }
                Piece::Zero { offset, len } => {
                    stats.zero_bytes += len;
                    done += len;
                    if job.target_reads_zero {
                        Ok(())
                    } else {
                        zero_range(&dst_buffered, dst_is_block, offset, len)
                    }
                }
            };
            if let Err(e) = r {
                write_err = Some(e);
                break;
            }
            progress(done, size);
        }
        drop(rx);
        let read_result = reader.join().expect("reader thread panicked");
        if let Some(e) = write_err {
            return Err(e);
        }
        read_result
    })?;
    let transferred = started.elapsed();
    dst_buffered.sync_data()?;
    dst.sync_data()?;
    stats.transfer_ms = transferred.as_millis() as u64;
    stats.flush_ms = (started.elapsed() - transferred).as_millis() as u64;
    stats.checksum = hasher.map(ChunkHasher::finish);
    Ok(stats)
}

/// One unit of reader work: a zero range to pass on, or a data range of at
/// most [`CHUNK`] bytes to read.
#[derive(Clone, Copy)]
enum Job {
    Zero { offset: u64, len: u64 },
    Read { offset: u64, len: usize },
}

/// Plans the reads from the source's data extents. With `grid`, on the
/// checksum's chunks instead: each chunk with any data in it is read
/// whole (its holes read as zeros), so that one reader sees all of it.
fn plan(src: &File, size: u64, grid: bool) -> Vec<Job> {
    let mut jobs = Vec::new();
    if grid {
        let step = checksum::CHUNK as u64;
        let mut pos = 0u64;
        while pos < size {
            let end = (pos + step).min(size);
            if next_data(src, pos, end).0 < end {
                jobs.push(Job::Read {
                    offset: pos,
                    len: (end - pos) as usize,
                });
            } else {
                match jobs.last_mut() {
                    Some(Job::Zero { offset, len }) if *offset + *len == pos => *len += end - pos,
                    _ => jobs.push(Job::Zero {
                        offset: pos,
                        len: end - pos,
                    }),
                }
            }
            pos = end;
        }
        return jobs;
    }
    let mut pos = 0u64;
    while pos < size {
        let (data_start, data_end) = next_data(src, pos, size);
        if data_start > pos {
            jobs.push(Job::Zero {
                offset: pos,
                len: data_start - pos,
            });
        }
        let mut off = data_start;
        while off < data_end {
            let len = CHUNK.min((data_end - off) as usize);
            jobs.push(Job::Read { offset: off, len });
            off += len as u64;
        }
        pos = data_end;
    }
    jobs
}

/// Several readers keep the source busy (one sequential reader leaves
/// most of a disk's bandwidth unused); pieces are positional, so the
/// writer takes them in any order.
fn read_pieces(
    src: &File,
    size: u64,
    tx: mpsc::SyncSender<Piece>,
    recycle: mpsc::Receiver<Buf>,
    hasher: Option<&ChunkHasher>,
) -> Result<()> {
    let jobs = plan(src, size, hasher.is_some());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let recycle = std::sync::Mutex::new(recycle);
    let take_buf = || {
        recycle
            .lock()
            .ok()
            .and_then(|r| r.try_recv().ok())
            .unwrap_or_else(Buf::new)
    };
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..READERS)
            .map(|_| {
                let tx = tx.clone();
                let (jobs, next, take_buf) = (&jobs, &next, &take_buf);
                s.spawn(move || -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(job) = jobs.get(i) else { return Ok(()) };
                        let pieces = match *job {
                            Job::Zero { offset, len } => vec![Piece::Zero { offset, len }],
                            Job::Read { offset, len } => {
                                let mut buf = take_buf();
                                // Direct reads need an aligned length; the
                                // bytes past `len` are not used.
                                let want = len.div_ceil(ALIGN) * ALIGN;
                                read_full_at(src, &mut buf[..want], offset)?;
                                if let Some(h) = hasher {
                                    h.chunk(offset / checksum::CHUNK as u64, &buf[..len]);
                                }
                                split(buf, len, offset, take_buf)
                            }
                        };
                        for p in pieces {
                            if tx.send(p).is_err() {
                                return Ok(());
                            }
                        }
                    }
                })
            })
            .collect();
        drop(tx);
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("reader thread panicked"))
    })
}

/// Splits a chunk read at `offset` into runs of zero and non-zero blocks.
fn split(buf: Buf, len: usize, offset: u64, take_buf: &dyn Fn() -> Buf) -> Vec<Piece> {
    let mut runs: Vec<(bool, usize, usize)> = Vec::new();
    let mut i = 0;
    while i < len {
        let end = (i + BLOCK).min(len);
        let zero = is_zero(&buf[i..end]);
        match runs.last_mut() {
            Some((z, _, e)) if *z == zero => *e = end,
            _ => runs.push((zero, i, end)),
        }
        i = end;
    }
    let mut out = Vec::with_capacity(runs.len());
    if let [(false, 0, end)] = runs[..] {
        if end == len {
            out.push(Piece::Data { offset, buf, len });
            return out;
        }
    }
    for (zero, a, b) in runs {
        out.push(if zero {
            Piece::Zero {
                offset: offset + a as u64,
                len: (b - a) as u64,
            }
        } else {
            let mut part = take_buf();
            part[..b - a].copy_from_slice(&buf[a..b]);
            Piece::Data {
                offset: offset + a as u64,
                buf: part,
                len: b - a,
            }
        });
    }
    out
}

/// The next data extent at or after `pos`, as (start, end), clipped to
/// `size`. Sources that cannot tell (block devices) are all data.
fn next_data(src: &File, pos: u64, size: u64) -> (u64, u64) {
    let fd = src.as_raw_fd();
    // SAFETY: lseek on a valid descriptor with plain integer arguments.
    let start = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
    if start < 0 {
        let errno = std::io::Error::last_os_error().raw_os_error();
        // ENXIO: no data after pos, the rest is a hole.
        return if errno == Some(libc::ENXIO) {
            (size, size)
        } else {
            (pos, size)
        };
    }
    let start = (start as u64).min(size);
    // SAFETY: as above.
    let end = unsafe { libc::lseek(fd, start as libc::off_t, libc::SEEK_HOLE) };
    let end = if end < 0 { size } else { (end as u64).min(size) };
    (start, end.max(start))
}

fn read_full_at(f: &File, buf: &mut [u8], offset: u64) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = f.read_at(&mut buf[done..], offset + done as u64)?;
        if n == 0 {
            // Past the end of a shorter source: the rest reads as zeros.
            buf[done..].fill(0);
            break;
        }
        done += n;
    }
    Ok(())
}

pub fn is_zero(buf: &[u8]) -> bool {
    // SAFETY: u128 has no invalid bit patterns; align_to splits correctly.
    let (pre, mid, post) = unsafe { buf.align_to::<u128>() };
    pre.iter().all(|&b| b == 0) && mid.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}

const BLKZEROOUT: libc::c_ulong = 0x127f;

/// Makes a range of the target read as zeros, as cheaply as the target
/// allows: BLKZEROOUT on a block device, FALLOC_FL_ZERO_RANGE on a file,
/// writing zeros as the last resort.
fn zero_range(dst: &File, is_block: bool, offset: u64, len: u64) -> Result<()> {
    let fd = dst.as_raw_fd();
    let rc = if is_block && offset.is_multiple_of(512) && len.is_multiple_of(512) {
        let range = [offset, len];
        // SAFETY: BLKZEROOUT takes a pointer to two u64s.
        unsafe { libc::ioctl(fd, BLKZEROOUT, range.as_ptr()) }
    } else if !is_block {
        // SAFETY: plain integer arguments on a valid descriptor.
        unsafe {
            libc::fallocate(
                fd,
                libc::FALLOC_FL_ZERO_RANGE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        }
    } else {
        -1
    };
    if rc == 0 {
        return Ok(());
    }
    let zeros = vec![0u8; CHUNK];
    let mut off = offset;
    let end = offset + len;
    while off < end {
        let n = CHUNK.min((end - off) as usize);
        dst.write_all_at(&zeros[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

fn qemu_img_convert(job: &CopyJob, progress: &mut (dyn FnMut(u64, u64) + Send)) -> Result<CopyStats> {
    let started = std::time::Instant::now();
    let mut cmd = Command::new("qemu-img");
    cmd.args([
        "convert",
        "-p",
        "-n",
        "-f",
        job.source_format.qemu_name(),
        "-O",
        job.target_format.qemu_name(),
    ]);
    if let Some(b) = &job.target_backing {
        // -B makes qemu-img copy only what the source allocates above its
        // own backing file (the same data as the target's), and leave the
        // rest to show through. With -n it names no file to open: the
        // target keeps the backing pointer it was created with.
        cmd.args(["-B", &b.name, "-F", b.format.qemu_name()]);
    } else if job.target_reads_zero {
        cmd.arg("--target-is-zero");
    }
    cmd.arg(&job.source).arg(&job.target);
    if let Some(dir) = job.source.parent() {
        // Relative backing-file names resolve beside the source.
        cmd.current_dir(dir);
    }
    let line = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    // qemu-img -p prints "    (12.50/100%)\r".
    let mut reader = BufReader::new(stdout);
    let mut buf = Vec::new();
    while reader.read_until(b'\r', &mut buf).unwrap_or(0) > 0 {
        let text = String::from_utf8_lossy(&buf);
        if let Some(pct) = text.trim().strip_prefix('(').and_then(|t| t.split('/').next()) {
            if let Ok(p) = pct.trim().parse::<f64>() {
                progress((job.size as f64 * p / 100.0) as u64, job.size);
            }
        }
        buf.clear();
    }
    let status = child.wait()?;
    let stderr = err_reader.join().unwrap_or_default();
    if !status.success() {
        return Err(StorageError::Tool {
            cmd: line,
            stderr: stderr.trim().to_string(),
        });
    }
    progress(job.size, job.size);
    Ok(CopyStats {
        data_bytes: allocated(&job.target),
        zero_bytes: 0,
        checksum: None,
        // qemu-img's whole run (with whatever flush it makes) counts as
        // the transfer.
        transfer_ms: started.elapsed().as_millis() as u64,
        flush_ms: 0,
    })
}

fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn job(src: &Path, dst: &Path, size: u64, zero: bool) -> CopyJob {
        CopyJob {
            source: src.into(),
            source_format: Format::Raw,
            source_has_parent: false,
            target: dst.into(),
            target_format: Format::Raw,
            target_reads_zero: zero,
            target_backing: None,
            size,
            checksum: false,
        }
    }

    #[test]
    fn raw_copy_keeps_content_and_skips_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let dst = dir.path().join("dst");
        let size = 40 * 1024 * 1024u64;
        let mut f = File::create(&src).unwrap();
        f.set_len(size).unwrap();
        // Data at 1 MiB and 20 MiB, a hole elsewhere, and an explicit zero block.
        f.write_all_at(&vec![7u8; 300_000], 1 << 20).unwrap();
        f.write_all_at(&vec![9u8; 70_000], 20 << 20).unwrap();
        f.write_all_at(&vec![0u8; 1 << 20], 30 << 20).unwrap();
        f.flush().unwrap();
        File::create(&dst).unwrap().set_len(size).unwrap();
        let mut last = 0;
        let stats = run(&job(&src, &dst, size, true), &mut |d, _| last = d).unwrap();
        assert_eq!(last, size);
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        assert!(
            stats.data_bytes < 1 << 20,
            "wrote {} bytes of data",
            stats.data_bytes
        );
        assert_eq!(stats.data_bytes + stats.zero_bytes, size);
        assert!(allocated(&dst) < 2 << 20, "target allocated {}", allocated(&dst));
    }

    #[test]
    fn a_checksummed_copy_gives_the_checksum_of_what_it_wrote() {
        use ramsnap_common::checksum::{digest_file, Algorithm};
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let dst = dir.path().join("dst");
        // Capacity past the source's end (a FILE dump shrinks to its size),
        // data across a chunk boundary, a hole, a zero block, a short tail.
        let chunk = ramsnap_common::checksum::CHUNK as u64;
        let size = 5 * chunk + 4096;
        let f = File::create(&src).unwrap();
        f.write_all_at(&vec![7u8; 300_000], chunk - 100_000).unwrap();
        f.write_all_at(&vec![0u8; 1 << 20], 2 * chunk).unwrap();
        f.write_all_at(&[5u8; 10], 3 * chunk + 12_345).unwrap();
        let src_len = f.metadata().unwrap().len();
        assert!(src_len < size);
        File::create(&dst).unwrap().set_len(size).unwrap();
        let mut j = job(&src, &dst, size, true);
        j.checksum = true;
        let stats = run(&j, &mut |_, _| {}).unwrap();
        let want = digest_file(&src, size, Algorithm::Blake3Chunks).unwrap().checksum;
        assert_eq!(stats.checksum, Some(want));
        assert_eq!(
            digest_file(&dst, size, Algorithm::Blake3Chunks).unwrap().checksum,
            want
        );
        // Without asking: none; a qcow2 copy cannot give one.
        assert_eq!(
            run(&job(&src, &dst, size, false), &mut |_, _| {})
                .unwrap()
                .checksum,
            None
        );
        j.source_format = Format::Cow;
        let e = run(&j, &mut |_, _| {}).unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
    }

    #[test]
    fn raw_copy_zeroes_a_dirty_target() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let dst = dir.path().join("dst");
        let size = 4 * 1024 * 1024u64;
        File::create(&src).unwrap().set_len(size).unwrap();
        std::fs::write(&dst, vec![0xffu8; size as usize]).unwrap();
        run(&job(&src, &dst, size, false), &mut |_, _| {}).unwrap();
        assert!(std::fs::read(&dst).unwrap().iter().all(|&b| b == 0));
    }

    fn qemu(dir: &Path, args: &[&str]) -> String {
        let out = Command::new(args[0])
            .args(&args[1..])
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Bytes the image's own layer holds (depth 0 of `qemu-img map`),
    /// data or zero clusters alike.
    fn own_layer_bytes(dir: &Path, image: &str) -> u64 {
        let map = qemu(dir, &["qemu-img", "map", "-f", "qcow2", "--output=json", image]);
        let map: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
        map.iter()
            .filter(|e| e["depth"] == 0 && (e["data"] == true || e["zero"] == true))
            .map(|e| e["length"].as_u64().unwrap())
            .sum()
    }

    #[test]
    fn a_layer_copy_writes_only_the_top_layer() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(&dst).unwrap();
        let mib = 1024 * 1024u64;
        // base: 8 MiB of 0x11; child: 1 MiB of 0x22 and a zeroed 64 KiB
        // over the base's data.
        qemu(&src, &["qemu-img", "create", "-q", "-f", "raw", "base", "16M"]);
        qemu(
            &src,
            &["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 8M", "base"],
        );
        qemu(
            &src,
            &[
                "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "base", "-F", "raw", "child", "16M",
            ],
        );
        qemu(
            &src,
            &[
                "qemu-io",
                "-f",
                "qcow2",
                "-c",
                "write -P 0x22 1M 1M",
                "-c",
                "write -z 4M 64k",
                "child",
            ],
        );
        std::fs::copy(src.join("base"), dst.join("base")).unwrap();
        qemu(
            &dst,
            &[
                "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "base", "-F", "raw", "child", "16M",
            ],
        );
        let job = CopyJob {
            source: src.join("child"),
            source_format: Format::Cow,
            source_has_parent: true,
            target: dst.join("child"),
            target_format: Format::Cow,
            target_reads_zero: false,
            target_backing: Some(Backing {
                name: "base".into(),
                format: Format::Raw,
            }),
            size: 16 * mib,
            checksum: false,
        };
        run(&job, &mut |_, _| {}).unwrap();
        qemu(
            dir.path(),
            &[
                "qemu-img",
                "compare",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                "src/child",
                "dst/child",
            ],
        );
        let own = own_layer_bytes(&dst, "child");
        assert_eq!(own, own_layer_bytes(&src, "child"));
        assert!(own <= mib + 64 * 1024, "the target's own layer holds {own} bytes");
        let info = qemu(&dst, &["qemu-img", "info", "--output=json", "child"]);
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(
            info["backing-filename"], "base",
            "the backing pointer is untouched"
        );
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 1000]));
        let mut v = vec![0u8; 1000];
        v[999] = 1;
        assert!(!is_zero(&v));
        v[999] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
    }
}
