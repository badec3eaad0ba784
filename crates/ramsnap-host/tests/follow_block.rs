//! The BLOCK dump follower on a real loop device, with a real writer
//! process that the follower must find by itself (as it finds QEMU or
//! libvirt's I/O helper): its chunks are hashed while the device is
//! written, and the checksum taken with them is the one taken after.
//! Needs root (a loop device), as the storage tests do.
mod support;

use ramsnap_common::checksum::{digest_file_after, Algorithm};
use ramsnap_host::metadata::follow_block_dump;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const MIB: u64 = 1 << 20;

#[test]
fn a_block_dump_is_hashed_while_its_writer_writes_it() {
    let dir = tempfile::tempdir().unwrap();
    let capacity = 96 * MIB;
    let device = support::LoopDevice::new(dir.path(), capacity);
    // A link to it, as the storage service hands out.
    let link = dir.path().join("dump");
    std::os::unix::fs::symlink(&device.device, &link).unwrap();

    // The writer: a process whose name starts as QEMU's does (the name of
    // the link it is started by), writing 64 MiB in order, 1 MiB at a
    // time, slowly enough to be followed.
    let writer = dir.path().join("qemu-test-writer");
    std::os::unix::fs::symlink("/usr/bin/python3", &writer).unwrap();
    let script = r#"
import os, sys, time, hashlib
fd = os.open(sys.argv[1], os.O_WRONLY)
for i in range(64):
    block = b"".join(hashlib.sha256(b"%d/%d" % (i, j)).digest() for j in range(32768))
    os.write(fd, block)
    time.sleep(0.01)
os.close(fd)
"#;
    let stop = Arc::new(AtomicBool::new(false));
    let follower = {
        let (link, stop) = (link.clone(), stop.clone());
        std::thread::spawn(move || follow_block_dump(&link, capacity, &stop))
    };
    let status = Command::new(&writer)
        .args(["-c", script])
        .arg(&device.device)
        .status()
        .unwrap();
    assert!(status.success());
    stop.store(true, Ordering::Release);
    let followed = follower.join().unwrap().unwrap();
    assert!(
        followed.bytes() >= 32 * MIB,
        "most of the 64 MiB hashed while written: {} bytes",
        followed.bytes()
    );
    let with = digest_file_after(&link, capacity, Algorithm::CURRENT, Some(&followed)).unwrap();
    let without = digest_file_after(&link, capacity, Algorithm::CURRENT, None).unwrap();
    assert_eq!(with.checksum, without.checksum);
    assert_eq!(with.data_end, 64 * MIB);
}
