//! A thin, typed wrapper over the LVM command-line tools.
//!
//! Hosts without device-mapper (like these build machines) cannot activate
//! LVs; every call then runs with `activation=0`, which still reads and
//! writes real LVM2 metadata. See [`crate::block`] for how such hosts reach
//! an LV's data.
use crate::error::{Result, StorageError};
use crate::tool;
use std::path::Path;
use std::process::Command;

/// Whether the kernel has device-mapper. Asks the kernel (/proc/misc), not
/// /dev: libdevmapper creates /dev/mapper/control even where it cannot work.
pub fn device_mapper_available() -> bool {
    static DM: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DM.get_or_init(|| {
        std::fs::read_to_string("/proc/misc").is_ok_and(|m| m.lines().any(|l| l.ends_with(" device-mapper")))
    })
}

fn lvm(sub: &str) -> Command {
    let mut cmd = Command::new(sub);
    if let Some(dir) = system_dir() {
        cmd.env("LVM_SYSTEM_DIR", dir);
    }
    if !device_mapper_available() {
        cmd.args(["--config", "global { activation = 0 }"]);
    }
    cmd
}

/// What ramsnap changes in the host's LVM configuration for its own
/// commands, as (section, setting, value):
/// - `global/use_aio = 0`. LVM reads metadata through a Linux AIO context
///   by default, and destroying that context on exit waits for an RCU
///   grace period: 30-36 ms of every command's 55-60 ms on these machines
///   (`strace -T`: `io_destroy <0.0298>`), on a snapshot path of 10-20
///   commands.
/// - `backup/retain_days = 0`, `backup/retain_min = 50` (as oVirt's vdsm
///   sets them). Every command that changes a VG archives its metadata
///   and first lists the whole archive directory; by default an archive
///   is kept 30 days, so a busy domain's VG leaves thousands a day and
///   every LVM command slows with them (on this machine, 33,854 archives
///   made an `lvcreate` or `lvremove` 91 ms instead of 53, most of it
///   `getdents64`). Now each of ramsnap's VGs keeps its last 50.
///
/// LVM reads use_aio before it applies `--config`, so these are in an
/// lvm.conf.
const OVERRIDES: [(&str, &str, &str); 3] = [
    ("global", "use_aio", "0"),
    ("backup", "retain_min", "50"),
    ("backup", "retain_days", "0"),
];

/// `conf` (`lvmconfig --type full`'s output, which has every setting
/// once: LVM warns on every command about a setting given twice) with
/// [`OVERRIDES`]: each setting's line replaced, or added in its own
/// section at the end when the host has none.
fn with_overrides(conf: &str) -> String {
    let mut found = [false; OVERRIDES.len()];
    let mut out: String = conf
        .lines()
        .map(|l| {
            let t = l.trim_start();
            for (i, (_, key, value)) in OVERRIDES.iter().enumerate() {
                let rest = t.strip_prefix(key).map(str::trim_start);
                if rest.is_some_and(|r| r.starts_with('=')) {
                    found[i] = true;
                    return format!("\t{key}={value} # ramsnap: see crates/ramsnap-storage/src/lvm.rs");
                }
            }
            l.to_string()
        })
        .collect::<Vec<_>>()
        .join("\n");
    for (i, (section, key, value)) in OVERRIDES.iter().enumerate() {
        if !found[i] {
            out.push_str(&format!("\n{section} {{\n\t{key}={value}\n}}"));
        }
    }
    out.push('\n');
    out
}

/// An LVM system directory whose lvm.conf is the host's whole effective
/// configuration (`lvmconfig --type full`: its lvm.conf and lvmlocal.conf
/// with every default spelled out, so the backup, archive and profile
/// directories stay where the host has them) with [`with_overrides`];
/// its `devices` is a link to the host's, for a devices file. Named by its
/// content, so agents on one host share it. `None` (the host's own
/// configuration, unchanged) when any of that fails: it only saves time.
///
/// It lies in the temporary directory, which anyone may write: an LVM
/// configuration can name programs that LVM runs as root, so a directory
/// is used only while it and its lvm.conf belong to this user and nobody
/// else can write them (checked on every use: two `lstat`s), and only if
/// its lvm.conf said what this process would have written when first
/// found (see [`is_ours`]).
fn system_dir() -> Option<&'static Path> {
    static DIR: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    let dir = DIR
        .get_or_init(|| match make_system_dir() {
            Ok(dir) => Some(dir),
            Err(e) => {
                tracing::warn!(error = %e, "LVM commands run with the host's configuration as it is");
                None
            }
        })
        .as_deref()?;
    // A temporary directory can be cleaned under a long-running agent,
    // and its name taken by someone else.
    (owned(dir, true) && owned(&dir.join("lvm.conf"), false)).then_some(dir)
}

fn make_system_dir() -> std::io::Result<std::path::PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let host = std::env::var_os("LVM_SYSTEM_DIR").map_or_else(|| "/etc/lvm".into(), std::path::PathBuf::from);
    let out = Command::new("lvmconfig")
        .args(["--type", "full"])
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .stdin(std::process::Stdio::null())
        .output()?;
    if !out.status.success() || out.stdout.is_empty() {
        return Err(std::io::Error::other(format!(
            "lvmconfig --type full failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let conf = with_overrides(&String::from_utf8_lossy(&out.stdout));
    let name = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, conf.as_bytes());
    let tmp = std::env::temp_dir();
    let dir = tmp.join(format!("ramsnap-lvm-{name}"));
    if is_ours(&dir, &conf) {
        return Ok(dir);
    }
    // Built aside, in a directory of this process's own making (create,
    // not open: it fails if the name is taken), then renamed into place:
    // another agent may be doing the same.
    let part = tmp.join(format!(
        "ramsnap-lvm-{name}.{}.{}",
        std::process::id(),
        uuid::Uuid::new_v4()
    ));
    std::fs::DirBuilder::new().mode(0o700).create(&part)?;
    std::os::unix::fs::symlink(host.join("devices"), part.join("devices"))?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(part.join("lvm.conf"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, conf.as_bytes()))?;
    match std::fs::rename(&part, &dir) {
        Ok(()) => Ok(dir),
        Err(_) if is_ours(&dir, &conf) => {
            let _ = std::fs::remove_dir_all(&part);
            Ok(dir)
        }
        // The name is held by something else: this process keeps its own.
        Err(_) => Ok(part),
    }
}

/// `path` (not a link) belongs to this user and only this user can write
/// it; a directory, or a regular file.
fn owned(path: &Path, dir: bool) -> bool {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    std::fs::symlink_metadata(path)
        .is_ok_and(|m| m.uid() == me && m.mode() & 0o022 == 0 && if dir { m.is_dir() } else { m.is_file() })
}

/// `dir` is a system directory this process may use: see [`system_dir`].
fn is_ours(dir: &Path, conf: &str) -> bool {
    owned(dir, true)
        && owned(&dir.join("lvm.conf"), false)
        && std::fs::read_to_string(dir.join("lvm.conf")).is_ok_and(|c| c == conf)
}

pub fn pvcreate(device: &Path) -> Result<()> {
    tool::run(lvm("pvcreate").arg("--yes").arg(device)).map(drop)
}

pub fn vgcreate(vg: &str, device: &Path, extent_size_mib: u64, tags: &[String]) -> Result<()> {
    let mut cmd = lvm("vgcreate");
    cmd.args(["--physicalextentsize", &format!("{extent_size_mib}m")]);
    for t in tags {
        cmd.args(["--addtag", t]);
    }
    tool::run(cmd.arg(vg).arg(device)).map(drop)
}

pub fn vg_change_tags(vg: &str, remove: &[String], add: &[String]) -> Result<()> {
    if remove.is_empty() && add.is_empty() {
        return Ok(());
    }
    let mut cmd = lvm("vgchange");
    for t in remove {
        cmd.args(["--deltag", t]);
    }
    for t in add {
        cmd.args(["--addtag", t]);
    }
    tool::run(cmd.arg(vg)).map(drop)
}

/// One row of `vgs` across all devices.
#[derive(Debug, Clone)]
pub struct VgRow {
    pub name: String,
    pub tags: Vec<String>,
    pub pv: String,
}

pub fn vgs_all() -> Result<Vec<VgRow>> {
    let out = tool::run(lvm("vgs").args([
        "--noheadings",
        "--separator",
        "|",
        "-o",
        "vg_name,vg_tags,pv_name",
    ]))?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.trim().split('|').collect();
            (f.len() == 3).then(|| VgRow {
                name: f[0].into(),
                tags: split_tags(f[1]),
                pv: f[2].into(),
            })
        })
        .collect())
}

#[derive(Debug, Clone)]
pub struct VgInfo {
    pub size: u64,
    pub free: u64,
    pub extent_size: u64,
    pub pv: String,
    pub pe_start: u64,
    pub tags: Vec<String>,
}

pub fn vg_info(vg: &str) -> Result<VgInfo> {
    let out = tool::run(lvm("pvs").args([
        "--noheadings",
        "--units",
        "b",
        "--nosuffix",
        "--separator",
        "|",
        "-o",
        "pv_name,pe_start,vg_size,vg_free,vg_extent_size,vg_tags",
        "--select",
        &format!("vg_name={vg}"),
    ]))?;
    let line = out
        .lines()
        .find(|l| !l.trim().is_empty())
        .ok_or_else(|| StorageError::Tool {
            cmd: "pvs".into(),
            stderr: format!("volume group {vg} has no physical volume on this host"),
        })?;
    let f: Vec<&str> = line.trim().split('|').collect();
    if f.len() != 6 {
        return Err(bad_output("pvs", line));
    }
    Ok(VgInfo {
        pv: f[0].to_string(),
        pe_start: num(f[1])?,
        size: num(f[2])?,
        free: num(f[3])?,
        extent_size: num(f[4])?,
        tags: split_tags(f[5]),
    })
}

#[derive(Debug, Clone)]
pub struct LvRow {
    pub name: String,
    pub size: u64,
    pub tags: Vec<String>,
    /// First physical extent of its (single, contiguous) segment.
    pub first_pe: Option<u64>,
}

pub fn lvs(vg: &str) -> Result<Vec<LvRow>> {
    let out = tool::run(lvm("lvs").args([
        "--noheadings",
        "--units",
        "b",
        "--nosuffix",
        "--separator",
        "|",
        "-o",
        "lv_name,lv_size,lv_tags,seg_pe_ranges",
        vg,
    ]))?;
    let mut rows = Vec::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.trim().split('|').collect();
        if f.len() != 4 {
            return Err(bad_output("lvs", line));
        }
        // "/dev/loop0:10-34"
        let first_pe = f[3]
            .rsplit(':')
            .next()
            .and_then(|r| r.split('-').next())
            .and_then(|s| s.parse().ok());
        rows.push(LvRow {
            name: f[0].into(),
            size: num(f[1])?,
            tags: split_tags(f[2]),
            first_pe,
        });
    }
    Ok(rows)
}

/// Where an LV's segment lies: its PV device, and the byte offset and
/// length on it.
pub type Extent = (String, u64, u64);

/// Where an LV's (single, contiguous) segment lies: the PV device, and
/// the byte offset and length on it. One `pvs --segments` call. `tag`: the
/// LV must also carry it. None when no such LV is in the VG.
pub fn lv_extent(vg: &str, lv: &str, tag: Option<&str>) -> Result<Option<Extent>> {
    let mut select = format!("vg_name={vg} && lv_name={lv}");
    if let Some(t) = tag {
        select.push_str(&format!(" && lv_tags={{{t}}}"));
    }
    let mut found = segments(&select)?.into_iter();
    match (found.next(), found.next()) {
        (None, _) => Ok(None),
        (Some((_, extent)), None) => Ok(Some(extent)),
        (Some(_), Some(_)) => Err(StorageError::Tool {
            cmd: "pvs --segments".into(),
            stderr: format!("LV {vg}/{lv} is not one contiguous segment"),
        }),
    }
}

/// [`lv_extent`] of several LVs in one `pvs --segments` call, in their
/// order; an error when one is not in the VG or not one segment.
pub fn lv_extents(vg: &str, lvs: &[&str]) -> Result<Vec<Extent>> {
    if lvs.is_empty() {
        return Ok(Vec::new());
    }
    let names: Vec<String> = lvs.iter().map(|lv| format!("lv_name={lv}")).collect();
    let found = segments(&format!("vg_name={vg} && ({})", names.join(" || ")))?;
    lvs.iter()
        .map(|lv| {
            let mut of = found.iter().filter(|(name, _)| name == lv);
            match (of.next(), of.next()) {
                (Some((_, extent)), None) => Ok(extent.clone()),
                (None, _) => Err(StorageError::Tool {
                    cmd: "pvs --segments".into(),
                    stderr: format!("LV {vg}/{lv} is not in the VG"),
                }),
                (Some(_), Some(_)) => Err(StorageError::Tool {
                    cmd: "pvs --segments".into(),
                    stderr: format!("LV {vg}/{lv} is not one contiguous segment"),
                }),
            }
        })
        .collect()
}

/// `pvs --segments` of the segments `select` picks: `fields`, in bytes,
/// `|`-separated, one segment a line (free ones with an empty LV name).
fn pvs_segments(fields: &str, select: &str) -> Result<String> {
    tool::run(lvm("pvs").args([
        "--segments",
        "--noheadings",
        "--units",
        "b",
        "--nosuffix",
        "--separator",
        "|",
        "-o",
        fields,
        "--select",
        select,
    ]))
}

/// The PV segments `select` picks: each LV's name, and its PV device, byte
/// offset and length on it.
fn segments(select: &str) -> Result<Vec<(String, Extent)>> {
    let out = pvs_segments(
        "lv_name,pv_name,pe_start,vg_extent_size,pvseg_start,pvseg_size",
        select,
    )?;
    out.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|line| {
            let f: Vec<&str> = line.split('|').collect();
            if f.len() != 6 {
                return Err(bad_output("pvs", line));
            }
            let (pe_start, extent, first, count) = (num(f[2])?, num(f[3])?, num(f[4])?, num(f[5])?);
            Ok((
                f[0].to_string(),
                (f[1].to_string(), pe_start + first * extent, count * extent),
            ))
        })
        .collect()
}

/// All a create needs to know of a VG, read at once: its [`VgInfo`] (and
/// tags), each LV with its tags and where its segments lie, and its free
/// ranges. One `pvs --segments`, which lists free space as segments
/// without an LV, so it answers for a VG with no LVs too.
#[derive(Debug, Clone)]
pub struct VgReport {
    pub info: VgInfo,
    /// Each LV once, in the order of its first segment.
    pub lvs: Vec<LvRow>,
    /// Each LV's segments (name, extent), in PV order.
    pub segments: Vec<(String, Extent)>,
    /// The free ranges of its PV: first physical extent and count.
    pub free: Vec<(u64, u64)>,
}

pub fn vg_report(vg: &str) -> Result<VgReport> {
    let out = pvs_segments(
        "lv_name,lv_size,lv_tags,pv_name,pe_start,pvseg_start,pvseg_size,vg_size,vg_free,vg_extent_size,vg_tags",
        &format!("vg_name={vg}"),
    )?;
    parse_vg_report(vg, &out)
}

fn parse_vg_report(vg: &str, out: &str) -> Result<VgReport> {
    let mut info = None;
    let mut lvs: Vec<LvRow> = Vec::new();
    let mut segments = Vec::new();
    let mut free = Vec::new();
    for line in out.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let f: Vec<&str> = line.split('|').collect();
        if f.len() != 11 {
            return Err(bad_output("pvs", line));
        }
        let (pe_start, first, count, extent_size) = (num(f[4])?, num(f[5])?, num(f[6])?, num(f[9])?);
        info.get_or_insert(VgInfo {
            pv: f[3].to_string(),
            pe_start,
            size: num(f[7])?,
            free: num(f[8])?,
            extent_size,
            tags: split_tags(f[10]),
        });
        if f[0].is_empty() {
            free.push((first, count));
            continue;
        }
        segments.push((
            f[0].to_string(),
            (
                f[3].to_string(),
                pe_start + first * extent_size,
                count * extent_size,
            ),
        ));
        if !lvs.iter().any(|lv| lv.name == f[0]) {
            lvs.push(LvRow {
                name: f[0].into(),
                size: num(f[1])?,
                tags: split_tags(f[2]),
                first_pe: Some(first),
            });
        }
    }
    let info = info.ok_or_else(|| StorageError::Tool {
        cmd: "pvs --segments".into(),
        stderr: format!("volume group {vg} has no physical volume on this host"),
    })?;
    Ok(VgReport {
        info,
        lvs,
        segments,
        free,
    })
}

/// A new LV of `size` bytes (rounded up to whole extents) in one
/// contiguous segment: where LVM chooses, or within `at` (`PV:first-last`,
/// physical extents).
pub fn lvcreate(vg: &str, lv: &str, size: u64, tags: &[String], at: Option<&str>) -> Result<()> {
    let mut cmd = lvm("lvcreate");
    cmd.args([
        "--activate",
        "n",
        "--zero",
        "n",
        "--wipesignatures",
        "n",
        "--alloc",
        "contiguous",
    ]);
    cmd.args(["--size", &format!("{size}b"), "--name", lv]);
    for t in tags {
        cmd.args(["--addtag", t]);
    }
    cmd.arg(vg);
    cmd.args(at);
    tool::run(&mut cmd).map(drop)
}

pub fn lv_change_tags(vg: &str, lv: &str, remove: &[String], add: &[String]) -> Result<()> {
    lvs_change_tags(vg, &[lv], remove, add)
}

/// The same change of tags on several LVs, in one `lvchange`.
pub fn lvs_change_tags(vg: &str, lvs: &[&str], remove: &[String], add: &[String]) -> Result<()> {
    let mut cmd = lvm("lvchange");
    for t in remove {
        cmd.args(["--deltag", t]);
    }
    for t in add {
        cmd.args(["--addtag", t]);
    }
    for lv in lvs {
        cmd.arg(format!("{vg}/{lv}"));
    }
    tool::run(&mut cmd).map(drop)
}

pub fn lvremove(vg: &str, lv: &str) -> Result<()> {
    tool::run(lvm("lvremove").arg("--yes").arg(format!("{vg}/{lv}"))).map(drop)
}

pub fn lv_activate(vg: &str, lv: &str, on: bool) -> Result<()> {
    tool::run(
        lvm("lvchange")
            .args(["--activate", if on { "y" } else { "n" }])
            .arg(format!("{vg}/{lv}")),
    )
    .map(drop)
}

/// What a probe of a device before laying out a domain on it found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Readable, and blkid cleanly found no signature on it.
    Blank,
    /// Holds something, or could not be probed: why, for the message.
    NotBlank(String),
}

/// Whether `device` is blank. Anything but a clean "nothing found" from a
/// device this process could open and read is [`Probe::NotBlank`]: blkid
/// exits 2 both when it finds no signature and when it cannot open the
/// device (it does that on this host's root disk, "Operation not
/// permitted", with nothing on stdout), so the device is opened and its
/// first MiB read here first, and blkid's exit 2 counts as "nothing found"
/// only with no output and no complaint on stderr.
pub fn probe(device: &Path) -> Probe {
    use std::io::Read;
    let mut head = vec![0u8; 1024 * 1024];
    let read = std::fs::File::open(device).and_then(|mut f| f.read_exact(&mut head));
    if let Err(e) = read {
        return Probe::NotBlank(format!("its first MiB could not be read ({e})"));
    }
    let out = match Command::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(device)
        .stdin(std::process::Stdio::null())
        .output()
    {
        Ok(out) => out,
        Err(e) => return Probe::NotBlank(format!("blkid could not be run ({e})")),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let field = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .map(str::to_string)
    };
    match out.status.code() {
        Some(2) if stdout.trim().is_empty() && stderr.trim().is_empty() => Probe::Blank,
        Some(0) => Probe::NotBlank(
            field("TYPE")
                .or_else(|| field("PTTYPE").map(|t| format!("a {t} partition table")))
                .unwrap_or_else(|| "a signature blkid recognises".into()),
        ),
        code => Probe::NotBlank(format!(
            "blkid could not probe it (exit {}{})",
            code.map_or("by a signal".to_string(), |c| c.to_string()),
            if stderr.trim().is_empty() {
                String::new()
            } else {
                format!(": {}", stderr.trim())
            }
        )),
    }
}

fn split_tags(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(String::from)
        .collect()
}

fn num(s: &str) -> Result<u64> {
    s.trim().parse().map_err(|_| bad_output("lvm", s))
}

fn bad_output(cmd: &str, line: &str) -> StorageError {
    StorageError::Tool {
        cmd: cmd.into(),
        stderr: format!("unexpected output: {line:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What LVM 2.03 printed for a VG with two LVs and two free ranges.
    #[test]
    fn vg_report_reads_lvs_free_space_and_vg_fields() {
        let out =
            "  lv1|12582912|IU_x,RS_LEGAL|/dev/loop0|1048576|0|3|205520896|184549376|4194304|RS_WRITER_3\n\
                   \x20 |0||/dev/loop0|1048576|3|17|205520896|184549376|4194304|RS_WRITER_3\n\
                   \x20 lv2|8388608|IU_y|/dev/loop0|1048576|20|2|205520896|184549376|4194304|RS_WRITER_3\n\
                   \x20 |0||/dev/loop0|1048576|22|27|205520896|184549376|4194304|RS_WRITER_3\n";
        let r = parse_vg_report("vg", out).unwrap();
        assert_eq!(
            (r.info.pv.as_str(), r.info.free, r.info.extent_size),
            ("/dev/loop0", 184549376, 4194304)
        );
        assert_eq!(r.info.tags, ["RS_WRITER_3"]);
        let names: Vec<_> = r
            .lvs
            .iter()
            .map(|l| (l.name.as_str(), l.size, l.first_pe))
            .collect();
        assert_eq!(names, [("lv1", 12582912, Some(0)), ("lv2", 8388608, Some(20))]);
        assert_eq!(r.lvs[0].tags, ["IU_x", "RS_LEGAL"]);
        assert_eq!(r.free, [(3, 17), (22, 27)]);
        assert_eq!(
            r.segments[1],
            (
                "lv2".to_string(),
                ("/dev/loop0".to_string(), 1048576 + 20 * 4194304, 2 * 4194304)
            )
        );
        // A VG with no LV still has its free segment, and so its fields.
        let empty = parse_vg_report(
            "vg",
            "  |0||/dev/loop0|1048576|0|49|205520896|205520896|4194304|\n",
        )
        .unwrap();
        assert!(empty.lvs.is_empty() && empty.info.tags.is_empty());
        assert!(parse_vg_report("vg", "").is_err());
        assert!(parse_vg_report("vg", "lv1|12|x|/dev/loop0").is_err());
    }

    #[test]
    fn use_aio_is_replaced_in_place_or_added() {
        let conf = "global {\n\tumask=63\n\tuse_aio=1\n}\nbackup {\n\tbackup=1\n}\n";
        let out = with_overrides(conf);
        assert_eq!(out.matches("use_aio").count(), 1, "{out}");
        assert!(out.contains("\tuse_aio=0"), "{out}");
        assert!(out.contains("\tumask=63") && out.contains("\tbackup=1"), "{out}");
        let out = with_overrides("backup {\n\tbackup=1\n}\n");
        assert!(out.contains("global {\n\tuse_aio=0\n}\n"), "{out}");
    }

    #[test]
    fn archive_retention_is_bounded_in_place_or_added() {
        let conf =
            "backup {\n\tarchive=1\n\tretain_min=10\n\tretain_days = 30\n}\nglobal {\n\tuse_aio=1\n}\n";
        let out = with_overrides(conf);
        for (setting, value) in [("retain_min", "50"), ("retain_days", "0"), ("use_aio", "0")] {
            assert_eq!(out.matches(setting).count(), 1, "{out}");
            assert!(out.contains(&format!("\t{setting}={value} ")), "{out}");
        }
        assert!(out.contains("\tarchive=1"), "{out}");
        // A setting whose name begins with another's is left alone.
        let out = with_overrides("backup {\n\tretain_min_extra=1\n}\n");
        assert!(out.contains("\tretain_min_extra=1\n"), "{out}");
        assert!(out.contains("backup {\n\tretain_min=50\n}\n"), "{out}");
    }

    /// The real LVM on this host reads ramsnap's directory as the host's
    /// configuration with AIO off and the archive's retention bounded,
    /// without a warning, and keeps the host's backup and archive
    /// directories.
    #[test]
    fn lvm_reads_the_system_dir_as_the_hosts_config_without_aio() {
        let dir = make_system_dir().expect("an LVM system directory");
        let ask = |system: Option<&Path>| {
            let mut cmd = Command::new("lvmconfig");
            cmd.args([
                "--type",
                "full",
                "global/use_aio",
                "backup/backup_dir",
                "backup/archive_dir",
                "backup/retain_min",
                "backup/retain_days",
            ])
            .env("LVM_SUPPRESS_FD_WARNINGS", "1");
            if let Some(d) = system {
                cmd.env("LVM_SYSTEM_DIR", d);
            }
            let out = cmd.output().expect("lvmconfig runs");
            assert!(out.status.success());
            (
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        };
        let (host, _) = ask(None);
        let (ours, warnings) = ask(Some(&dir));
        assert!(warnings.trim().is_empty(), "{warnings}");
        assert!(ours.contains("use_aio=0"), "{ours}");
        assert!(
            ours.contains("retain_min=50") && ours.contains("retain_days=0"),
            "{ours}"
        );
        let mut expected = host.clone();
        for (setting, value) in [("use_aio", "0"), ("retain_min", "50"), ("retain_days", "0")] {
            expected = expected
                .lines()
                .map(|l| match l.trim_start().split_once('=') {
                    Some((k, _)) if k == setting => format!("{setting}={value}"),
                    _ => l.to_string(),
                })
                .collect::<Vec<_>>()
                .join("\n");
        }
        assert_eq!(
            expected.trim(),
            ours.trim(),
            "only use_aio and the archive's retention differ from the host's configuration"
        );
        assert_eq!(
            make_system_dir().expect("again"),
            dir,
            "named by content: the same directory"
        );
    }

    /// A directory under that name that someone else could have written is
    /// never used: not with another lvm.conf, not writable by others, not
    /// through a link.
    #[test]
    fn a_system_dir_anyone_could_write_is_not_used() {
        use std::os::unix::fs::PermissionsExt;
        let mode =
            |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let conf_path = dir.path().join("lvm.conf");
        let conf = "global {\n\tuse_aio=0\n}\n";
        std::fs::write(&conf_path, conf).unwrap();
        mode(dir.path(), 0o700);
        mode(&conf_path, 0o644);
        assert!(is_ours(dir.path(), conf));
        assert!(!is_ours(
            dir.path(),
            "global {\n\tthin_check_executable=\"/tmp/x\"\n}\n"
        ));
        mode(&conf_path, 0o666);
        assert!(!is_ours(dir.path(), conf), "a file others can write");
        mode(&conf_path, 0o644);
        mode(dir.path(), 0o1777);
        assert!(!is_ours(dir.path(), conf), "a directory others can write");
        mode(dir.path(), 0o700);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        assert!(!is_ours(&link, conf), "a link");
    }
}
