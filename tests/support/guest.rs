//! The test guest (tests/guest/), built once per test process into
//! `target/ramsnap-guest` with tests/guest/build.sh (fast when nothing
//! changed: it rewrites no file whose content is the same).
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The kernel the VMs boot (uncompressed: much faster under TCG).
pub const KERNEL: &str = "vmlinux";
pub const INITRD: &str = "initramfs.img";
pub const CMDLINE: &str = "console=ttyS0 loglevel=0 panic=-1";

/// The workspace root (the parent of this package's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The cargo target directory the test executable runs from.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    // target/<profile>/deps/<test>
    exe.ancestors()
        .nth(3)
        .unwrap_or_else(|| panic!("unexpected test executable location {}", exe.display()))
        .to_path_buf()
}

/// The directory holding `vmlinux` and `initramfs.img`, built on first use.
pub fn guest_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = target_dir().join("ramsnap-guest");
        std::fs::create_dir_all(&out).expect("creating target/ramsnap-guest");
        // Other test processes may build at the same time: one at a time.
        let lock = std::fs::File::create(target_dir().join("ramsnap-guest.lock")).expect("guest build lock");
        // SAFETY: flock(2) on a descriptor this function owns.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock on the guest build lock");
        let script = workspace_root().join("tests/guest/build.sh");
        let result = Command::new("bash")
            .arg(&script)
            .arg(&out)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        assert!(
            result.status.success(),
            "{} {} failed ({}); install its inputs with scripts/setup/libvirt.sh:\n{}",
            script.display(),
            out.display(),
            result.status,
            String::from_utf8_lossy(&result.stderr)
        );
        for f in [KERNEL, INITRD] {
            assert!(
                out.join(f).is_file(),
                "the guest build made no {}",
                out.join(f).display()
            );
        }
        out
    })
}
