//! oVirt 3.3 export domains, written the way oVirt writes them
//! (`../shared/reference/ovirt-export-domain.md`), for tests that import
//! from one: VDSM's domain metadata with its `_SHA_CKSUM`, volumes with
//! `KEY=VALUE` `.meta` files ending in `EOF` (sizes in sectors, `DISKTYPE=2`
//! on every volume as 3.3 has it), a qcow2 child naming its parent as
//! `../<image>/<parent>`, files owned by 36:36 (vdsm:kvm), and the engine's
//! OVF, made from the real 3.3 sample (`tests/data/ovirt-3.3-vmOvfData.xml`,
//! ovirt-engine's `vmOvfData.xml`) with the test's ids put in.
use ramsnap_common::ovirt::meta;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::process::Command;
use uuid::Uuid;

/// The sample OVF, as `crates/ramsnap-snapshot`'s reader tests it.
pub const SAMPLE_OVF: &str = include_str!("../data/ovirt-3.3-vmOvfData.xml");

/// The sample's ids, which [`Ovf`] replaces.
mod sample {
    pub const VM: &str = "70f24c82-a7b8-4e0b-9192-cffd5705cf5c";
    pub const IMAGE: &str = "8c634412-1e8b-4ef3-bc40-b67a456e9d2f";
    pub const BASE: &str = "0d7bd2b4-3c1d-4b8e-9d44-63d87ee3a0f1";
    pub const LEAF: &str = "f934b12c-1e22-4ad8-bbce-ec0b2a5defa4";
    pub const SNAPSHOT: &str = "22eab740-c6ec-4edb-b417-c4ad9efe628a";
    pub const ACTIVE: &str = "b60fcbad-d65a-4248-ae32-7f9411276df0";
    pub const MEMORY: &str = "44b6c877-d062-47a8-82e2-93972d262546,aaef93d0-feb2-44b3-85b9-d5ae28734b14,478f4e8d-48e1-4265-82dd-a7844b61d6cb,903d4392-0001-446f-9cdb-d0cade8b44a0,1fc95389-c167-42c5-8ef6-720f4f369331,878da22e-6d07-4f38-aa55-8f698e678421";
}

/// vdsm:kvm.
const VDSM_UID: u32 = 36;
const KVM_GID: u32 = 36;

/// An oVirt export domain: `<location>/<id>/`.
pub struct OvirtDomain {
    pub id: Uuid,
    /// The directory to register (the domain's parent).
    pub location: PathBuf,
    pub dir: PathBuf,
}

/// The keys of an export domain's `dom_md/metadata` as VDSM 3.3 writes
/// them when it creates an NFS export domain.
pub fn domain_keys(id: Uuid, description: &str) -> BTreeMap<String, String> {
    [
        ("CLASS", "Backup".to_string()),
        ("DESCRIPTION", description.to_string()),
        ("IOOPTIMEOUTSEC", "10".into()),
        ("LEASERETRIES", "3".into()),
        ("LEASETIMESEC", "60".into()),
        ("LOCKPOLICY", String::new()),
        ("LOCKRENEWALINTERVALSEC", "5".into()),
        ("POOL_UUID", String::new()),
        ("REMOTE_PATH", "nfs.example.com:/exports/export1".into()),
        ("ROLE", "Regular".into()),
        ("SDUUID", id.to_string()),
        ("TYPE", "NFS".into()),
        ("VERSION", "0".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

impl OvirtDomain {
    /// A detached export domain (no POOL_UUID).
    pub fn create(location: &Path, description: &str) -> OvirtDomain {
        OvirtDomain::create_in_pool(location, description, None)
    }

    /// An export domain; with `pool`, attached to that oVirt data center.
    pub fn create_in_pool(location: &Path, description: &str, pool: Option<Uuid>) -> OvirtDomain {
        let id = Uuid::new_v4();
        let dir = location.join(id.to_string());
        for d in ["dom_md", "images", "master/vms", "master/tasks"] {
            fs::create_dir_all(dir.join(d)).unwrap();
        }
        let mut keys = domain_keys(id, description);
        if let Some(p) = pool {
            keys.insert("POOL_UUID".into(), p.to_string());
        }
        let md = meta::write_domain(&keys).unwrap();
        fs::write(dir.join("dom_md/metadata"), md).unwrap();
        for f in ["ids", "leases", "inbox", "outbox"] {
            fs::write(dir.join("dom_md").join(f), b"").unwrap();
        }
        let d = OvirtDomain {
            id,
            location: location.to_path_buf(),
            dir,
        };
        d.own_all();
        d
    }

    pub fn volume_path(&self, image: Uuid, volume: Uuid) -> PathBuf {
        self.dir.join(format!("images/{image}/{volume}"))
    }

    pub fn meta_path(&self, image: Uuid, volume: Uuid) -> PathBuf {
        self.dir.join(format!("images/{image}/{volume}.meta"))
    }

    /// Copies `data` in as the volume; a COW child's backing file becomes
    /// `../<image>/<parent>`, as VDSM 3.3 writes it. `capacity` in bytes.
    pub fn add_volume(
        &self,
        image: Uuid,
        volume: Uuid,
        parent: Option<(Uuid, &str)>,
        cow: bool,
        capacity: u64,
        data: &Path,
    ) {
        let img = self.dir.join(format!("images/{image}"));
        fs::create_dir_all(&img).unwrap();
        let target = self.volume_path(image, volume);
        let out = Command::new("cp")
            .args(["--sparse=always"])
            .arg(data)
            .arg(&target)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cp: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some((p, format)) = parent {
            let out = Command::new("qemu-img")
                .current_dir(&img)
                .args(["rebase", "-u", "-b", &format!("../{image}/{p}"), "-F", format])
                .arg(&target)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "qemu-img rebase: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.write_meta(image, volume, parent.map(|p| p.0), cow, capacity, "LEAF");
    }

    /// A RAW volume holding `bytes`, padded with zeros to `capacity`.
    pub fn add_raw_bytes(&self, image: Uuid, volume: Uuid, capacity: u64, bytes: &[u8]) {
        fs::create_dir_all(self.dir.join(format!("images/{image}"))).unwrap();
        let mut content = bytes.to_vec();
        assert!(content.len() as u64 <= capacity);
        content.resize(capacity as usize, 0);
        fs::write(self.volume_path(image, volume), content).unwrap();
        self.write_meta(image, volume, None, false, capacity, "LEAF");
    }

    /// A volume's `.meta`, with its keys in VDSM's order.
    pub fn write_meta(
        &self,
        image: Uuid,
        volume: Uuid,
        parent: Option<Uuid>,
        cow: bool,
        capacity: u64,
        voltype: &str,
    ) {
        let text = meta::write_volume(&[
            ("DOMAIN", self.id.to_string()),
            ("VOLTYPE", voltype.to_string()),
            ("CTIME", "1380000000".into()),
            ("FORMAT", if cow { "COW" } else { "RAW" }.into()),
            ("IMAGE", image.to_string()),
            ("DISKTYPE", "2".into()),
            ("PUUID", parent.unwrap_or(Uuid::nil()).to_string()),
            ("LEGALITY", "LEGAL".into()),
            ("MTIME", "0".into()),
            ("POOL_UUID", String::new()),
            ("SIZE", (capacity.div_ceil(512)).to_string()),
            ("TYPE", "SPARSE".into()),
            ("DESCRIPTION", String::new()),
        ])
        .unwrap();
        fs::write(self.meta_path(image, volume), text).unwrap();
    }

    /// Marks every volume but the leaves INTERNAL, as VDSM keeps a chain.
    pub fn mark_internal(&self, image: Uuid, volume: Uuid) {
        let path = self.meta_path(image, volume);
        let text = fs::read_to_string(&path)
            .unwrap()
            .replace("VOLTYPE=LEAF", "VOLTYPE=INTERNAL");
        fs::write(path, text).unwrap();
    }

    pub fn put_ovf(&self, vm: Uuid, ovf: &str) {
        let d = self.dir.join(format!("master/vms/{vm}"));
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join(format!("{vm}.ovf")), ovf).unwrap();
        self.own_all();
    }

    /// Every file as vdsm:kvm, as on a real export domain.
    pub fn own_all(&self) {
        let out = Command::new("chown")
            .args(["-R", &format!("{VDSM_UID}:{KVM_GID}")])
            .arg(&self.dir)
            .output()
            .unwrap();
        assert!(out.status.success());
        chown(&self.dir, Some(VDSM_UID), Some(KVM_GID)).unwrap();
    }

    /// (path, content digest) of every file under the domain, sorted: to
    /// see that an import changed nothing.
    pub fn fingerprint(&self) -> Vec<(String, String)> {
        let out = Command::new("sh")
            .arg("-c")
            .arg("find . -type f -print0 | sort -z | xargs -0 sha1sum; find . | sort")
            .current_dir(&self.dir)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| match l.split_once("  ") {
                Some((h, p)) => (p.to_string(), h.to_string()),
                None => (l.to_string(), String::new()),
            })
            .collect()
    }
}

/// What the sample OVF becomes: the test VM's ids and values.
pub struct Ovf<'a> {
    pub vm: Uuid,
    pub name: &'a str,
    pub memory_mib: u64,
    pub image: Uuid,
    /// The REGULAR snapshot's volume (the chain's base), and its format.
    pub base: Uuid,
    pub base_format: &'a str,
    /// The ACTIVE snapshot's volume (COW, on the base).
    pub leaf: Uuid,
    pub snapshot: Uuid,
    pub active: Uuid,
    /// `domain,pool,dump image,dump volume,metadata image,metadata volume`.
    pub memory: String,
    /// Direct kernel boot, as oVirt's VmBase keeps it.
    pub kernel: &'a str,
    pub initrd: &'a str,
    pub cmdline: &'a str,
}

impl Ovf<'_> {
    pub fn xml(&self) -> String {
        let boot = format!(
            "<Name>{}</Name>\n        <KernelUrl>{}</KernelUrl>\n        <InitrdUrl>{}</InitrdUrl>\n        <KernelParams>{}</KernelParams>",
            self.name,
            xml_text(self.kernel),
            xml_text(self.initrd),
            xml_text(self.cmdline)
        );
        SAMPLE_OVF
            .replace(sample::VM, &self.vm.to_string())
            .replace(sample::IMAGE, &self.image.to_string())
            .replace(sample::BASE, &self.base.to_string())
            .replace(sample::LEAF, &self.leaf.to_string())
            .replace(sample::SNAPSHOT, &self.snapshot.to_string())
            .replace(sample::ACTIVE, &self.active.to_string())
            .replace(sample::MEMORY, &self.memory)
            .replace("<Name>exporttedVM</Name>", &boot)
            .replace(
                "<rasd:VirtualQuantity>1024</rasd:VirtualQuantity>",
                &format!("<rasd:VirtualQuantity>{}</rasd:VirtualQuantity>", self.memory_mib),
            )
            .replace(
                "ovf:volume-format=\"RAW\"",
                &format!("ovf:volume-format=\"{}\"", self.base_format),
            )
    }
}

fn xml_text(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A Python 2 pickle (protocol 0, what VDSM 3.3's `pickle.dumps` wrote) of
/// the dict VDSM kept in a memory snapshot's metadata volume.
pub fn vdsm_memory_pickle(domain_xml: &str) -> Vec<u8> {
    // MARK DICT PUT, then per item: key, PUT, value, (PUT,) SETITEM; STOP.
    let xml = python2_escape(domain_xml);
    format!(
        "(dp0\nS'restoreFromSnapshot'\np1\nI01\nsS'_srcDomXML'\np2\nS'{xml}'\np3\nsS'elapsedTimeOffset'\np4\nF12.5\ns."
    )
    .into_bytes()
}

/// Python 2's `repr` escaping of a byte string, inside single quotes.
fn python2_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'\\' => out.push_str("\\\\"),
            b'\'' => out.push_str("\\'"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out
}

/// The domain XML in a libvirt save image's header: the NUL-terminated
/// text after its 92 bytes (`virQEMUSaveHeader`).
pub fn save_header_xml(dump: &Path) -> String {
    use std::io::Read;
    let mut bytes = Vec::new();
    fs::File::open(dump)
        .unwrap()
        .take(4 << 20)
        .read_to_end(&mut bytes)
        .unwrap();
    assert_eq!(&bytes[..16], b"LibvirtQemudSave", "a libvirt save image");
    let data = &bytes[92..];
    let end = data.iter().position(|&b| b == 0).unwrap();
    String::from_utf8(data[..end].to_vec()).unwrap()
}
