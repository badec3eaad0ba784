//! An empty qcow2 image (version 3, 64 KiB clusters, 16-bit refcounts),
//! written here instead of by `qemu-img create`: a snapshot makes one
//! overlay per disk, and starting qemu-img (a cold binary after the page
//! cache was dropped, dozens of shared libraries) took longer than the
//! write itself. The layout is the one `qemu-img create -f qcow2 -o
//! preallocation=off [-u -b NAME -F FORMAT]` makes: the header in cluster
//! 0 (with the backing format extension and the backing file name), the
//! refcount table in cluster 1, its one refcount block in cluster 2, and
//! the L1 table from cluster 3. Tests check it against qemu-img (`check`,
//! `info`, reads through the backing file, writes).
//!
//! [`fully_allocated_size`] is `qemu-img measure`'s "fully allocated size":
//! how large an LV must be for a qcow2 image of a given virtual size.
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

const MAGIC: u32 = 0x5146_49fb;
const CLUSTER_BITS: u32 = 16;
pub const CLUSTER_SIZE: u64 = 1 << CLUSTER_BITS;
const REFCOUNT_ORDER: u32 = 4;
const HEADER_LENGTH: u32 = 112;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// QEMU's limit on the L1 table (QCOW_MAX_L1_SIZE).
const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on a backing file name.
const MAX_BACKING_NAME: usize = 1023;

/// An image's backing file, as its header names it.
pub struct BackingFile<'a> {
    /// Relative to the image's directory (or absolute).
    pub name: &'a str,
    /// "raw" or "qcow2".
    pub format: &'a str,
}

/// Writes an empty overlay of the volume `meta` describes at byte `base`
/// of `f`, its parent (if any) as backing file, named by volume id as the
/// parent's file (FILE) or link (BLOCK) beside it is. The caller syncs.
pub fn create_volume_at(
    f: &File,
    base: u64,
    meta: &crate::model::VolumeMeta,
    parent: Option<&crate::model::VolumeMeta>,
) -> io::Result<()> {
    let name = parent.map(|p| p.volume.to_string());
    let backing = parent.zip(name.as_deref()).map(|(p, name)| BackingFile {
        name,
        format: p.format.qemu_name(),
    });
    create_at(f, base, meta.capacity, backing)
}

/// The backing file name in a qcow2 header (None: no backing file), read
/// from the start of `path` (a file, or a device).
pub fn backing_name(path: &std::path::Path) -> io::Result<Option<String>> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path)?;
    let mut head = [0u8; 20];
    f.read_exact_at(&mut head, 0)?;
    if &head[..4] != b"QFI\xfb" {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a qcow2 image"));
    }
    let offset = u64::from_be_bytes(head[8..16].try_into().expect("8 bytes"));
    let size = u32::from_be_bytes(head[16..20].try_into().expect("4 bytes")) as usize;
    if offset == 0 || size == 0 {
        return Ok(None);
    }
    if size > 4096 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a backing file name over 4 KiB",
        ));
    }
    let mut name = vec![0u8; size];
    f.read_exact_at(&mut name, offset)?;
    String::from_utf8(name).map(Some).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "a backing file name that is not UTF-8",
        )
    })
}

/// What a qcow2 header says about where the image's data comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderFacts {
    pub backing: Option<String>,
    /// Incompatible feature bit 2: the guest data lives in another file,
    /// named in a header extension (qcow2 version 3).
    pub external_data_file: bool,
}

/// Reads [`HeaderFacts`] from the qcow2 image at `path`.
pub fn header_facts(path: &std::path::Path) -> io::Result<HeaderFacts> {
    use std::os::unix::fs::FileExt;
    let backing = backing_name(path)?;
    let f = File::open(path)?;
    let mut version = [0u8; 4];
    f.read_exact_at(&mut version, 4)?;
    let external_data_file = match u32::from_be_bytes(version) {
        2 => false,
        3 => {
            let mut features = [0u8; 8];
            f.read_exact_at(&mut features, 72)?;
            u64::from_be_bytes(features) & (1 << 2) != 0
        }
        v => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("qcow2 version {v} is not 2 or 3"),
            ))
        }
    };
    Ok(HeaderFacts {
        backing,
        external_data_file,
    })
}

fn l1_entries(size: u64) -> u64 {
    // Each L2 table maps a cluster's worth of 8-byte entries.
    let per_l2 = CLUSTER_SIZE * (CLUSTER_SIZE / 8);
    size.div_ceil(per_l2)
}

/// Writes an empty image of `size` virtual bytes at the start of `f` (a
/// new file, or a device). Everything the image's metadata covers is
/// written, zeros included, so a device's old content does not matter.
pub fn create(f: &File, size: u64, backing: Option<BackingFile<'_>>) -> io::Result<()> {
    create_at(f, 0, size, backing)
}

/// [`create`], with the image starting at byte `base` of `f` (an LV's
/// first extent on its PV).
pub fn create_at(f: &File, base: u64, size: u64, backing: Option<BackingFile<'_>>) -> io::Result<()> {
    let l = Layout::new(size, backing)?;
    let cluster = |bytes: &[u8]| {
        let mut c = bytes.to_vec();
        c.resize(CLUSTER_SIZE as usize, 0);
        c
    };
    f.write_all_at(&cluster(&l.refcount_table), base + CLUSTER_SIZE)?;
    f.write_all_at(&cluster(&l.refcounts), base + 2 * CLUSTER_SIZE)?;
    let zeros = vec![0u8; CLUSTER_SIZE as usize];
    let mut at = 0;
    while at < l.l1_bytes {
        let n = (l.l1_bytes - at).min(CLUSTER_SIZE);
        f.write_all_at(&zeros[..n as usize], base + 3 * CLUSTER_SIZE + at)?;
        at += n;
    }
    // The header last: until it is there, this is not a qcow2 image.
    f.write_all_at(&cluster(&l.header), base)?;
    Ok(())
}

/// [`create`] into a new, empty file: the same image, but only the bytes
/// that are not zero are written, and the rest of the tables are a hole
/// (`set_len`), which reads as zeros. A snapshot's overlay thus dirties a
/// few pages, not the 256 KiB of its zero-filled tables. Refuses a file
/// that is not empty: its old bytes would show through the holes.
pub fn create_in_empty_file(f: &File, size: u64, backing: Option<BackingFile<'_>>) -> io::Result<()> {
    let len = f.metadata()?.len();
    if len != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a sparse qcow2 image needs an empty file, this one has {len} bytes"),
        ));
    }
    let l = Layout::new(size, backing)?;
    f.write_all_at(&l.refcount_table, CLUSTER_SIZE)?;
    f.write_all_at(&l.refcounts, 2 * CLUSTER_SIZE)?;
    f.set_len(3 * CLUSTER_SIZE + l.l1_bytes)?;
    f.write_all_at(&l.header, 0)?;
    Ok(())
}

/// The bytes of an empty image that are not all zeros, each from the start
/// of its cluster: the header (cluster 0), the refcount table (1) and its
/// refcount block (2). The L1 table (from cluster 3, `l1_bytes` long) is
/// all zeros.
struct Layout {
    header: Vec<u8>,
    refcount_table: Vec<u8>,
    refcounts: Vec<u8>,
    l1_bytes: u64,
}

impl Layout {
    fn new(size: u64, backing: Option<BackingFile<'_>>) -> io::Result<Layout> {
        let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
        if size == 0 || !size.is_multiple_of(512) {
            return Err(invalid(format!(
                "qcow2 virtual size {size} is not a positive multiple of 512"
            )));
        }
        let l1 = l1_entries(size);
        let l1_bytes = l1 * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(invalid(format!("qcow2 virtual size {size} is too large")));
        }
        let l1_clusters = l1_bytes.div_ceil(CLUSTER_SIZE).max(1);

        let mut h = Vec::with_capacity(CLUSTER_SIZE as usize);
        let be32 = |h: &mut Vec<u8>, v: u32| h.extend_from_slice(&v.to_be_bytes());
        let be64 = |h: &mut Vec<u8>, v: u64| h.extend_from_slice(&v.to_be_bytes());
        // The backing file name goes after the header and its extensions.
        let mut ext = Vec::new();
        if let Some(b) = &backing {
            if b.name.is_empty() || b.name.len() > MAX_BACKING_NAME || b.name.contains('\0') {
                return Err(invalid(format!("bad qcow2 backing file name {:?}", b.name)));
            }
            if !matches!(b.format, "raw" | "qcow2") {
                return Err(invalid(format!("bad qcow2 backing format {:?}", b.format)));
            }
            be32(&mut ext, EXT_BACKING_FORMAT);
            be32(&mut ext, b.format.len() as u32);
            ext.extend_from_slice(b.format.as_bytes());
            ext.resize(ext.len().next_multiple_of(8), 0);
        }
        // The end of the extensions.
        be32(&mut ext, 0);
        be32(&mut ext, 0);
        let name_offset = HEADER_LENGTH as u64 + ext.len() as u64;

        be32(&mut h, MAGIC);
        be32(&mut h, 3);
        match &backing {
            Some(b) => {
                be64(&mut h, name_offset);
                be32(&mut h, b.name.len() as u32);
            }
            None => {
                be64(&mut h, 0);
                be32(&mut h, 0);
            }
        }
        be32(&mut h, CLUSTER_BITS);
        be64(&mut h, size);
        be32(&mut h, 0); // no encryption
        be32(&mut h, l1 as u32);
        be64(&mut h, 3 * CLUSTER_SIZE); // L1 table
        be64(&mut h, CLUSTER_SIZE); // refcount table
        be32(&mut h, 1); // refcount table clusters
        be32(&mut h, 0); // snapshots
        be64(&mut h, 0);
        be64(&mut h, 0); // incompatible features
        be64(&mut h, 0); // compatible features
        be64(&mut h, 0); // autoclear features
        be32(&mut h, REFCOUNT_ORDER);
        be32(&mut h, HEADER_LENGTH);
        h.push(0); // compression type: zlib
        h.resize(HEADER_LENGTH as usize, 0);
        h.extend_from_slice(&ext);
        if let Some(b) = &backing {
            h.extend_from_slice(b.name.as_bytes());
        }

        // The refcount block is in cluster 2.
        let refcount_table = (2 * CLUSTER_SIZE).to_be_bytes().to_vec();
        // Clusters 0 to 2 and the L1 table's are in use, once each.
        let refcounts = 1u16.to_be_bytes().repeat((3 + l1_clusters) as usize);
        Ok(Layout {
            header: h,
            refcount_table,
            refcounts,
            l1_bytes,
        })
    }
}

/// `qemu-img measure -O qcow2 --size SIZE`'s "fully allocated size" for
/// this module's layout (QEMU's qcow2_calc_prealloc_size): the data and
/// every table it could need.
pub fn fully_allocated_size(size: u64) -> u64 {
    let cs = CLUSTER_SIZE;
    let aligned = size.next_multiple_of(cs);
    let mut meta = cs; // header
    let nl2e = (aligned / cs).next_multiple_of(cs / 8);
    meta += nl2e * 8;
    let nl1e = (nl2e * 8 / cs).next_multiple_of(cs / 8);
    meta += nl1e * 8;
    meta += refcount_metadata_size((meta + aligned) / cs);
    meta + aligned
}

/// QEMU's qcow2_refcount_metadata_size (without its generous increase).
fn refcount_metadata_size(clusters: u64) -> u64 {
    let per_table_cluster = CLUSTER_SIZE / 8;
    let per_block = CLUSTER_SIZE * 8 / (1 << REFCOUNT_ORDER);
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            return (blocks + table) * CLUSTER_SIZE;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::Command;

    fn qemu_img(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("qemu-img")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("qemu-img");
        assert!(
            out.status.success(),
            "qemu-img {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn info(dir: &Path, name: &str) -> serde_json::Value {
        let mut v: serde_json::Value =
            serde_json::from_str(&qemu_img(dir, &["info", "--output=json", name])).unwrap();
        let o = v.as_object_mut().unwrap();
        // Facts of the file, not of the image.
        for k in ["actual-size", "filename", "dirty-flag", "full-backing-filename"] {
            o.remove(k);
        }
        v
    }

    type Create = fn(&File, u64, Option<BackingFile<'_>>) -> io::Result<()>;

    #[test]
    fn images_are_what_qemu_img_makes_and_work_as_overlays() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for (i, (size, backing)) in [
            (1u64 << 30, Some("raw")),
            (64 << 20, Some("qcow2")),
            (512, None),
            ((3 << 40) + 4096, Some("raw")),
            ((5 << 30) + 512, None),
        ]
        .into_iter()
        .enumerate()
        {
            let base = format!("base{i}");
            let (ours, theirs) = (format!("ours{i}"), format!("theirs{i}"));
            let size_s = size.to_string();
            if let Some(fmt) = backing {
                qemu_img(d, &["create", "-q", "-f", fmt, &base, &size_s]);
                // Recognisable data in the backing file, read through both.
                qemu_img_io(d, &base, fmt, "write -P 0x5a 0 64k");
            }
            // Written whole (as on a device), and sparse into a new file.
            let sparse = format!("sparse{i}");
            for (name, write) in [(&ours, create as Create), (&sparse, create_in_empty_file)] {
                let f = File::create(d.join(name)).unwrap();
                write(
                    &f,
                    size,
                    backing.map(|format| BackingFile { name: &base, format }),
                )
                .unwrap();
            }
            // The sparse one has its zeros as a hole: 3 small writes, a page or so each.
            use std::os::unix::fs::MetadataExt;
            let allocated = std::fs::metadata(d.join(&sparse)).unwrap().blocks() * 512;
            assert!(allocated <= 3 * 4096, "sparse{i}: {allocated} bytes allocated");
            qemu_img(d, &["compare", "-q", "-f", "raw", "-F", "raw", &ours, &sparse]);
            let mut args = vec!["create", "-q", "-f", "qcow2"];
            if let Some(fmt) = backing {
                args.extend(["-u", "-b", &base, "-F", fmt]);
            }
            args.extend(["-o", "preallocation=off", &theirs, &size_s]);
            qemu_img(d, &args);

            qemu_img(d, &["check", "-q", &ours]);
            assert_eq!(
                info(d, &ours),
                info(d, &theirs),
                "size {size}, backing {backing:?}"
            );
            assert_eq!(
                std::fs::metadata(d.join(&ours)).unwrap().len(),
                std::fs::metadata(d.join(&theirs)).unwrap().len(),
                "file length, size {size}"
            );
            qemu_img(d, &["compare", "-q", &ours, &theirs]);
            // Written to, it stays consistent and reads back.
            let (at, len) = if size >= 2 << 20 {
                ("1m", "128k")
            } else {
                ("0", "512")
            };
            qemu_img_io(d, &ours, "qcow2", &format!("write -P 0xa5 {at} {len}"));
            qemu_img(d, &["check", "-q", &ours]);
            let read = qemu_img_io(d, &ours, "qcow2", &format!("read -P 0xa5 {at} {len}"));
            assert!(!read.contains("Pattern verification failed"), "{read}");
            if backing.is_some() {
                let read = qemu_img_io(d, &ours, "qcow2", "read -P 0x5a 0 64k");
                assert!(!read.contains("Pattern verification failed"), "{read}");
            }
        }
    }

    fn qemu_img_io(dir: &Path, name: &str, fmt: &str, cmd: &str) -> String {
        let out = Command::new("qemu-io")
            .current_dir(dir)
            .args(["-f", fmt, "-c", cmd, name])
            .output()
            .expect("qemu-io");
        assert!(
            out.status.success(),
            "qemu-io {cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn a_device_with_old_content_becomes_an_empty_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev");
        std::fs::write(&path, vec![0xffu8; 8 << 20]).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        create(&f, 4 << 30, None).unwrap();
        drop(f);
        qemu_img(dir.path(), &["check", "-q", "dev"]);
        let map = qemu_img(dir.path(), &["map", "--output=json", "-f", "qcow2", "dev"]);
        assert!(!map.contains("\"data\": true"), "{map}");
    }

    #[test]
    fn an_image_can_start_past_the_start_of_a_device() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pv");
        std::fs::write(&path, vec![0xeeu8; 1 << 20]).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        create_at(&f, 4 << 20, 1 << 30, None).unwrap();
        drop(f);
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            bytes[..1 << 20].iter().all(|&b| b == 0xee),
            "before the image: untouched"
        );
        std::fs::write(dir.path().join("img"), &bytes[4 << 20..]).unwrap();
        qemu_img(dir.path(), &["check", "-q", "img"]);
    }

    #[test]
    fn bad_sizes_and_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("x")).unwrap();
        for size in [0, 511, 1 << 62] {
            assert!(create(&f, size, None).is_err(), "{size}");
            assert!(create_in_empty_file(&f, size, None).is_err(), "{size}");
        }
        let long = "n".repeat(1024);
        for (name, format) in [
            ("", "raw"),
            (long.as_str(), "raw"),
            ("a\0b", "raw"),
            ("a", "vmdk"),
        ] {
            assert!(
                create(&f, 1 << 20, Some(BackingFile { name, format })).is_err(),
                "{name:?} {format}"
            );
        }
    }

    #[test]
    fn a_sparse_image_is_refused_a_file_with_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old");
        std::fs::write(&path, [0xffu8; 4096]).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let e = create_in_empty_file(&f, 1 << 30, None).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), [0xffu8; 4096], "left as it was");
    }

    #[test]
    fn fully_allocated_size_is_qemu_img_measure() {
        let dir = tempfile::tempdir().unwrap();
        for size in [
            512u64,
            1 << 20,
            (64 << 20) + 512,
            1 << 30,
            (1 << 30) + 65536,
            10 << 30,
            (2 << 40) + 12345 * 512,
            64 << 40,
        ] {
            let out = qemu_img(
                dir.path(),
                &["measure", "-O", "qcow2", "--size", &size.to_string()],
            );
            let want: u64 = out
                .lines()
                .find_map(|l| l.strip_prefix("fully allocated size:"))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            assert_eq!(fully_allocated_size(size), want, "size {size}");
        }
    }
}
