//! What the coordinator accepts, checked once, at the door: a value that a
//! host or the storage would refuse later (or that does not fit the
//! database) fails the call at once with INVALID_ARGUMENT naming the field
//! (`memory_bytes`, `disks[3].capacity_bytes`), before anything is created.
//! CreateVm and ImportVm (for the values it takes from an OVF) use the same
//! functions.
//!
//! | value | accepted | why |
//! |---|---|---|
//! | memory | 16 MiB ..= 4 TiB, a multiple of 1 MiB | the HostService's limits (`ramsnap-host` `VmSpec::validate`); QEMU sizes RAM in MiB |
//! | vCPUs | 1 ..= 240 | the most a KVM guest is supported with on RHEL 7 / oVirt 4 (oVirt 3.3 itself allowed 160); below QEMU's i440fx limit (255) and the HostService's (256) |
//! | disks | 1 ..= 26 | the host names them vda..vdz |
//! | disk capacity | 1 MiB ..= 64 TiB, a multiple of 512 bytes | a whole number of sectors (qemu-img rounds otherwise, and the volume would not be the size asked for) |
//! | names (VM, cluster, host) | 1 ..= 128 characters | no control or bidi-formatting characters, no leading or trailing white space |
//! | snapshot description | ..= 4096 bytes | no control or bidi-formatting characters |
//! | kernel command line | ..= 4096 bytes | no control or bidi-formatting characters; the host's limit |
//! | kernel, initrd | ..= 255 bytes | a plain file name in the hosts' boot directory: no `/`, no `..`; an initrd or a command line needs a kernel (the host refuses them alone) |
//! | host addresses | ..= 255 bytes | `http(s)://host:port` |
//!
//! The forbidden characters are those of `ramsnap_common::text`, the one
//! set every service applies: controls (C0, DEL, C1), the line and
//! paragraph separators, and the bidi formatting characters, which would
//! make a name print as another one ("Trojan Source").
use ramsnap_common::status;
use tonic::Status;

pub const MIB: u64 = 1 << 20;
pub const TIB: u64 = 1 << 40;

pub const MIN_MEMORY: u64 = 16 * MIB;
pub const MAX_MEMORY: u64 = 4 * TIB;
pub const MAX_VCPUS: u32 = 240;
pub const MAX_DISKS: usize = 26;
pub const MIN_DISK: u64 = MIB;
pub const MAX_DISK: u64 = 64 * TIB;
pub const DISK_ALIGN: u64 = 512;
/// Characters.
pub const MAX_NAME: usize = 128;
/// Bytes.
pub const MAX_DESCRIPTION: usize = 4096;
/// Bytes.
pub const MAX_CMDLINE: usize = 4096;
/// Bytes.
pub const MAX_BOOT_FILE: usize = 255;
/// Bytes.
pub const MAX_ADDRESS: usize = 255;

/// The first forbidden character of `value`, described for the error.
fn forbidden_in(value: &str) -> Option<String> {
    ramsnap_common::text::first_forbidden(value)
}

/// A name of a VM, cluster or host.
pub fn check_name(field: &str, name: &str) -> Result<(), Status> {
    let chars = name.chars().count();
    if chars == 0 || chars > MAX_NAME {
        return Err(status::invalid_argument(
            field,
            format!("must be 1-{MAX_NAME} characters (it has {chars})"),
        ));
    }
    if let Some(c) = forbidden_in(name) {
        return Err(status::invalid_argument(
            field,
            format!("must not contain control, line-separator or bidi-formatting characters ({c})"),
        ));
    }
    if name.trim() != name {
        return Err(status::invalid_argument(
            field,
            "must not start or end with white space",
        ));
    }
    Ok(())
}

/// Free text (a description): at most `max` bytes, no forbidden character.
pub fn check_text(field: &str, text: &str, max: usize) -> Result<(), Status> {
    if text.len() > max {
        return Err(status::invalid_argument(
            field,
            format!("must be at most {max} bytes (it has {})", text.len()),
        ));
    }
    if let Some(c) = forbidden_in(text) {
        return Err(status::invalid_argument(
            field,
            format!("must not contain control, line-separator or bidi-formatting characters ({c})"),
        ));
    }
    Ok(())
}

pub fn check_memory(field: &str, bytes: u64) -> Result<(), Status> {
    if !(MIN_MEMORY..=MAX_MEMORY).contains(&bytes) || !bytes.is_multiple_of(MIB) {
        return Err(status::invalid_argument(
            field,
            format!(
                "must be a multiple of 1 MiB between 16 MiB and 4 TiB ({MIN_MEMORY}..={MAX_MEMORY} bytes); got {bytes}"
            ),
        ));
    }
    Ok(())
}

pub fn check_vcpus(field: &str, vcpus: u32) -> Result<(), Status> {
    if !(1..=MAX_VCPUS).contains(&vcpus) {
        return Err(status::invalid_argument(
            field,
            format!("must be between 1 and {MAX_VCPUS}; got {vcpus}"),
        ));
    }
    Ok(())
}

pub fn check_disk_count(field: &str, n: usize) -> Result<(), Status> {
    if n == 0 {
        return Err(status::invalid_argument(
            field,
            "at least one disk is required (its domain also holds the VM's memory volumes)",
        ));
    }
    if n > MAX_DISKS {
        return Err(status::invalid_argument(
            field,
            format!("at most {MAX_DISKS} disks (vda..vdz); got {n}"),
        ));
    }
    Ok(())
}

pub fn check_disk_capacity(field: &str, bytes: u64) -> Result<(), Status> {
    if !(MIN_DISK..=MAX_DISK).contains(&bytes) || !bytes.is_multiple_of(DISK_ALIGN) {
        return Err(status::invalid_argument(
            field,
            format!(
                "must be a multiple of 512 bytes between 1 MiB and 64 TiB ({MIN_DISK}..={MAX_DISK} bytes); got {bytes}"
            ),
        ));
    }
    Ok(())
}

/// A direct-boot image: a plain file name inside the hosts' boot directory
/// (empty: none).
pub fn check_boot_file(field: &str, name: &str) -> Result<(), Status> {
    if name.len() > MAX_BOOT_FILE
        || name.contains('/')
        || name.contains("..")
        || name.chars().any(ramsnap_common::text::forbidden)
    {
        return Err(status::invalid_argument(
            field,
            format!(
                "must be a file name in the hosts' boot-image directory (no '/', no '..', no control \
                 characters, at most {MAX_BOOT_FILE} bytes)"
            ),
        ));
    }
    Ok(())
}

/// What a VM boots: kernel, initrd and command line, each checked, and an
/// initrd or a command line only with a kernel (the host refuses them
/// alone).
pub fn check_boot(prefix: &str, kernel: &str, initrd: &str, cmdline: &str) -> Result<(), Status> {
    check_boot_file(&format!("{prefix}kernel"), kernel)?;
    check_boot_file(&format!("{prefix}initrd"), initrd)?;
    check_text(&format!("{prefix}cmdline"), cmdline, MAX_CMDLINE)?;
    if kernel.is_empty() && (!initrd.is_empty() || !cmdline.is_empty()) {
        return Err(status::invalid_argument(
            &format!("{prefix}kernel"),
            "is required with an initrd or a command line",
        ));
    }
    Ok(())
}

/// A VM's configuration, as CreateVm gives it or an OVF describes it.
pub struct VmValues<'a> {
    /// None: not checked here (checked where it comes from).
    pub name: Option<&'a str>,
    pub memory_bytes: u64,
    pub vcpus: u32,
    pub kernel: &'a str,
    pub initrd: &'a str,
    pub cmdline: &'a str,
    pub disk_capacities: Vec<u64>,
}

/// Every value of a VM's configuration, fields named as in CreateVm.
pub fn check_vm(v: &VmValues<'_>) -> Result<(), Status> {
    if let Some(name) = v.name {
        check_name("name", name)?;
    }
    check_memory("memory_bytes", v.memory_bytes)?;
    check_vcpus("vcpus", v.vcpus)?;
    check_disk_count("disks", v.disk_capacities.len())?;
    for (i, c) in v.disk_capacities.iter().enumerate() {
        check_disk_capacity(&format!("disks[{i}].capacity_bytes"), *c)?;
    }
    check_boot("", v.kernel, v.initrd, v.cmdline)
}

/// A host's HostService or StorageService address: `http(s)://host:port`.
pub fn check_address(field: &str, a: &str) -> Result<(), Status> {
    let ok = a.len() <= MAX_ADDRESS
        && !a.chars().any(ramsnap_common::text::forbidden)
        && (a.starts_with("http://") || a.starts_with("https://"))
        && a.parse::<tonic::transport::Uri>()
            .is_ok_and(|u| u.host().is_some_and(|h| !h.is_empty()));
    if !ok {
        return Err(status::invalid_argument(
            field,
            format!(
                "{} is not an http(s)://host:port address of at most {MAX_ADDRESS} bytes",
                echo(a)
            ),
        ));
    }
    Ok(())
}

pub use ramsnap_common::text::echo;

#[cfg(test)]
mod tests {
    use super::*;

    fn field(r: Result<(), Status>) -> String {
        use tonic_types::StatusExt;
        let s = r.expect_err("refused");
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        s.get_error_details().bad_request().unwrap().field_violations[0]
            .field
            .clone()
    }

    #[test]
    fn names() {
        assert!(check_name("name", "web-1").is_ok());
        assert!(check_name("name", "Überserver 漢字").is_ok());
        assert!(check_name("name", &"x".repeat(128)).is_ok());
        for bad in [
            "",
            " x",
            "x ",
            "a\u{1b}[31m",
            "a\nb",
            "a\rb",
            "a\0b",
            "a\u{85}b",
            "a\u{202E}b",
            "a\u{2066}b",
            "a\u{200F}b",
            "a\u{7f}b",
        ] {
            assert_eq!(field(check_name("name", bad)), "name", "{bad:?}");
        }
        assert_eq!(field(check_name("name", &"x".repeat(129))), "name");
    }

    #[test]
    fn vm_values() {
        let good = || VmValues {
            name: Some("vm"),
            memory_bytes: 64 * MIB,
            vcpus: 1,
            kernel: "vmlinuz",
            initrd: "initrd.img",
            cmdline: "console=ttyS0",
            disk_capacities: vec![32 * MIB],
        };
        assert!(check_vm(&good()).is_ok());
        let cases: Vec<(VmValues, &str)> = vec![
            (
                VmValues {
                    memory_bytes: 1,
                    ..good()
                },
                "memory_bytes",
            ),
            (
                VmValues {
                    memory_bytes: 1 << 62,
                    ..good()
                },
                "memory_bytes",
            ),
            (
                VmValues {
                    memory_bytes: u64::MAX,
                    ..good()
                },
                "memory_bytes",
            ),
            (
                VmValues {
                    memory_bytes: 64 * MIB + 1,
                    ..good()
                },
                "memory_bytes",
            ),
            (VmValues { vcpus: 0, ..good() }, "vcpus"),
            (
                VmValues {
                    vcpus: u32::MAX,
                    ..good()
                },
                "vcpus",
            ),
            (
                VmValues {
                    disk_capacities: vec![],
                    ..good()
                },
                "disks",
            ),
            (
                VmValues {
                    disk_capacities: vec![MIB; 27],
                    ..good()
                },
                "disks",
            ),
            (
                VmValues {
                    disk_capacities: vec![MIB, MIB, MIB, 1],
                    ..good()
                },
                "disks[3].capacity_bytes",
            ),
            (
                VmValues {
                    disk_capacities: vec![u64::MAX],
                    ..good()
                },
                "disks[0].capacity_bytes",
            ),
            (
                VmValues {
                    disk_capacities: vec![MIB + 1],
                    ..good()
                },
                "disks[0].capacity_bytes",
            ),
            (
                VmValues {
                    kernel: "../vmlinuz",
                    ..good()
                },
                "kernel",
            ),
            (VmValues { kernel: "", ..good() }, "kernel"),
            (
                VmValues {
                    initrd: "a/b",
                    ..good()
                },
                "initrd",
            ),
            (
                VmValues {
                    cmdline: "a\nb",
                    ..good()
                },
                "cmdline",
            ),
        ];
        for (v, f) in cases {
            assert_eq!(field(check_vm(&v)), f);
        }
        assert!(check_vm(&VmValues {
            disk_capacities: vec![MIB; 26],
            ..good()
        })
        .is_ok());
        assert!(check_vm(&VmValues {
            kernel: "",
            initrd: "",
            cmdline: "",
            ..good()
        })
        .is_ok());
        assert!(check_vm(&VmValues {
            vcpus: 240,
            memory_bytes: 4 * TIB,
            ..good()
        })
        .is_ok());
    }

    #[test]
    fn addresses() {
        assert!(check_address("host_address", "http://10.0.0.1:50053").is_ok());
        assert!(check_address("host_address", "https://h.example:443").is_ok());
        for bad in ["10.0.0.1:1", "ftp://x:1", "http://", "http://a\nb:1"] {
            assert_eq!(
                field(check_address("host_address", bad)),
                "host_address",
                "{bad:?}"
            );
        }
        let long = format!("http://{}:1", "a".repeat(300));
        let err = check_address("a", &long).unwrap_err();
        assert!(err.message().len() < 300, "{}", err.message());
    }
}
