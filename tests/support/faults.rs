//! Faults for the crash tests: the coordinator's failpoints (a process that
//! exits at a node, or a saga held at a node while the test kills the
//! agents), and the checks that must hold after any crash: the coordinator,
//! libvirt and the disks agree.
use crate::cluster::{Cluster, Process, VmStatus, DOMAIN_PREFIX};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// The exit code of a process stopped by a failpoint.
pub const FAILPOINT_EXIT: i32 = 86;
/// A failpoint fires within this (a snapshot of a small guest, a boot).
pub const FAILPOINT_TIMEOUT: Duration = Duration::from_secs(180);
/// Status reports cross processes: after a restart they may take this long
/// to settle (a pause of libvirt's job seen at start, a follower that
/// reconnects).
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// `virsh -c qemu:///system ARGS`; fails the test when virsh does.
pub fn virsh(args: &[&str]) -> String {
    let out = Command::new("virsh")
        .args(["-c", "qemu:///system"])
        .args(args)
        .output()
        .expect("running virsh");
    assert!(
        out.status.success(),
        "virsh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The libvirt domain of a VM.
pub fn domain(vm_id: &str) -> String {
    format!("{DOMAIN_PREFIX}{vm_id}")
}

/// libvirt's state of the VM's domain ("running", "shut off", ...), or
/// None when libvirt has no such domain.
pub fn domain_state(vm_id: &str) -> Option<String> {
    let out = Command::new("virsh")
        .args(["-c", "qemu:///system", "domstate", &domain(vm_id)])
        .output()
        .expect("running virsh");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The file libvirt's vda is on now.
pub fn live_disk(vm_id: &str) -> String {
    virsh(&["domblklist", &domain(vm_id), "--details"])
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() >= 4 && f[2] == "vda")
        .map(|f| f[3].to_string())
        .unwrap_or_else(|| panic!("libvirt lists no vda for {}", domain(vm_id)))
}

/// Files QEMU holds open that were deleted under it.
pub fn deleted_files_held(vm_id: &str) -> Vec<String> {
    let pidfile = format!("/run/libvirt/qemu/{}.pid", domain(vm_id));
    let pid = std::fs::read_to_string(&pidfile).unwrap_or_else(|e| panic!("{pidfile}: {e}"));
    let fds = format!("/proc/{}/fd", pid.trim());
    std::fs::read_dir(&fds)
        .unwrap_or_else(|e| panic!("{fds}: {e}"))
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .filter(|p| p.ends_with(" (deleted)") && !p.starts_with("/memfd:"))
        .collect()
}

/// Waits (up to [`SETTLE_TIMEOUT`]) until the coordinator reports `status`
/// and libvirt's state satisfies `libvirt`.
async fn settle(c: &Cluster, vm_id: &str, status: VmStatus, libvirt: fn(Option<&str>) -> bool) {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let ours = c.get_vm(vm_id).await.status() == status;
        if (ours && libvirt(domain_state(vm_id).as_deref())) || Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A running VM after a crash: the coordinator reports UP, libvirt runs the
/// domain, libvirt's disk is the coordinator's leaf (the ACTIVE snapshot's
/// volume), that file exists, and QEMU holds no deleted file open.
pub async fn assert_running_agrees(c: &Cluster, vm_id: &str, what: &str) {
    settle(c, vm_id, VmStatus::Up, |s| s == Some("running")).await;
    let vm = c.get_vm(vm_id).await;
    if vm.status() != VmStatus::Up {
        c.fail(&format!(
            "{what}: the coordinator reports {:?}, not UP",
            vm.status()
        ));
    }
    let state = domain_state(vm_id);
    if state.as_deref() != Some("running") {
        c.fail(&format!("{what}: libvirt says the domain is {state:?}"));
    }
    let active = c.active_snapshot(vm_id).await;
    let leaf = active.disks[0].volume.clone().expect("a disk's volume");
    let live = live_disk(vm_id);
    if !live.ends_with(&format!("{}/{}", leaf.image_id, leaf.volume_id)) {
        c.fail(&format!(
            "{what}: the guest writes to {live}, the coordinator's leaf is {}/{}",
            leaf.image_id, leaf.volume_id
        ));
    }
    if !Path::new(&live).exists() {
        c.fail(&format!("{what}: the guest's disk {live} does not exist"));
    }
    let deleted = deleted_files_held(vm_id);
    if !deleted.is_empty() {
        c.fail(&format!("{what}: QEMU holds deleted files: {deleted:?}"));
    }
}

/// A stopped VM after a crash: the coordinator reports DOWN, libvirt runs
/// no such domain, and every volume the VM's snapshots name exists (with
/// nothing left over: [`Cluster::assert_no_orphans`]).
pub async fn assert_down_agrees(c: &Cluster, vm_id: &str, what: &str) {
    settle(c, vm_id, VmStatus::Down, |s| {
        s != Some("running") && s != Some("paused")
    })
    .await;
    let vm = c.get_vm(vm_id).await;
    if vm.status() != VmStatus::Down {
        c.fail(&format!(
            "{what}: the coordinator reports {:?}, not DOWN",
            vm.status()
        ));
    }
    let state = domain_state(vm_id);
    if matches!(state.as_deref(), Some("running") | Some("paused")) {
        c.fail(&format!("{what}: libvirt says the domain is {state:?}"));
    }
    c.assert_no_orphans().await;
}

/// Waits until the coordinator's log shows `needle`.
pub async fn wait_for_log(c: &Cluster, needle: &str, what: &str) {
    let deadline = Instant::now() + FAILPOINT_TIMEOUT;
    while Instant::now() < deadline {
        if c.logs().contains(needle) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.fail(&format!("{what}: the coordinator never logged {needle:?}"));
}

/// Waits for the process to exit at its failpoint and starts it again with
/// `env` (no failpoints when empty).
pub fn crashed_then_restarted(c: &mut Cluster, which: Process, what: &str, env: &[(&str, &str)]) {
    let status = c.process(which).exited_within(FAILPOINT_TIMEOUT);
    match status.and_then(|s| s.code()) {
        Some(FAILPOINT_EXIT) => {}
        other => c.fail(&format!(
            "{what}: {which:?} did not exit at the failpoint (exit {other:?})"
        )),
    }
    c.process(which).restart(env);
}

/// Holds a saga at a node while the agents die (separate processes only).
pub struct AgentKiller {
    release_dir: TempDir,
}

impl Default for AgentKiller {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentKiller {
    pub fn new() -> AgentKiller {
        AgentKiller {
            release_dir: tempfile::tempdir().expect("a temp dir for the release files"),
        }
    }

    /// Restarts the coordinator with a `hold` failpoint at `saga.node`: the
    /// next saga of that kind stops before the node's forward action.
    pub fn arm(&self, c: &mut Cluster, saga: &str, node: &str) {
        let failpoint = format!("{saga}.{node}=hold");
        let dir = self.release_dir.path().display().to_string();
        c.process(Process::Coordinator).restart(&[
            ("RAMSNAP_FAILPOINTS", failpoint.as_str()),
            ("RAMSNAP_FAILPOINT_DIR", dir.as_str()),
        ]);
    }

    /// Once the saga stands at the node: SIGKILLs both agents, lets the
    /// node run against nothing for a while (it gets no answer and must ask
    /// again, never unwind), then starts them again.
    pub async fn kill_agents_at(&self, c: &mut Cluster, saga: &str, node: &str, what: &str) {
        wait_for_log(c, &format!("failpoint {saga}.{node}=hold"), what).await;
        c.process(Process::HostAgent).kill();
        c.process(Process::StorageAgent).kill();
        let release = self.release_dir.path().join(format!("{saga}.{node}"));
        std::fs::write(&release, b"").expect("writing the release file");
        tokio::time::sleep(Duration::from_secs(2)).await;
        c.process(Process::StorageAgent).restart(&[]);
        c.process(Process::HostAgent).restart(&[]);
    }
}
