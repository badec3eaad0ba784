//! The snapshot verb (VDSM's vmSnapshot with oVirt 3.3's memory volume):
//! external qcow2 overlays for the disks and, optionally, the guest's RAM
//! into the dump volume plus the metadata volume.
//!
//! A snapshot runs as a job, keyed by the caller's job id: it goes on when
//! the caller goes away, a retry with the same id joins it (or gets its
//! result), and CancelSnapshot aborts it. A failed or cancelled snapshot
//! leaves the VM running on its previous disks and nothing of the snapshot
//! on the host: overlays torn down, the dump volume reading as zeros, the
//! metadata volume zeroed. When libvirt had already switched the disks (a
//! cancel during the checksum, or a too-large FILE dump noticed only at the
//! end), the overlays are merged back (active block commit, pivot onto the
//! previous leaves) and emptied again, so that they can be used once more.
//!
//! Guest pause time: libvirt's SUSPENDED/RESUMED lifecycle events during the
//! job, timestamped as they arrive (see `libvirt::pauses`); where no events
//! come, the domain state polled every 5 ms (an interval counts from the
//! midpoint between the last "running" and the first "paused" observation).
//! The result is at least QEMU's own downtime from libvirt's completed-job
//! stats, which leaves out the overlay switch that follows the dump.
use super::run::blocking_io;
use super::{Host, RunningDisk, Vm};
use crate::error::{HostError, LibvirtErrorKind, Result, SnapshotError};
use crate::libvirt::{CompletedJob, DomainState};
use crate::metadata::{self, DiskRecord, DumpRecord, Followed, MemoryMetadata};
use crate::model::{
    MemoryVolumes, Progress, SnapshotMode, SnapshotOutcome, SnapshotRequest, VmStatus, VolumeRef, MIB,
};
use crate::volumes::{Prepared, Purpose};
use crate::xml::{self, DiskFormat, DiskKind, DiskSource};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use uuid::Uuid;
use virt::sys;

/// Finished jobs are remembered this long, for retries.
const JOB_RETENTION: Duration = Duration::from_secs(3600);
const STATE_POLL: Duration = Duration::from_millis(5);
/// The state poll when libvirt's lifecycle events measure the pause (the
/// poll is then only the fallback clock and the cancel/size check): fewer
/// calls into libvirtd while QEMU writes the memory.
const STATE_POLL_WITH_EVENTS: Duration = Duration::from_millis(50);
const PROGRESS_POLL: Duration = Duration::from_millis(100);
const COMMIT_TIMEOUT: Duration = Duration::from_secs(600);

pub(super) fn snapshot_timeout(memory: u64) -> Duration {
    Duration::from_secs(300 + memory / (10 * MIB))
}

/// What a snapshot job's watchers see.
#[derive(Debug, Clone)]
pub struct JobView {
    pub progress: Progress,
    /// Set once, when the job ends.
    pub outcome: Option<std::result::Result<SnapshotOutcome, HostError>>,
}

pub(crate) struct Job {
    pub id: Uuid,
    pub vm_id: Uuid,
    pub snapshot_id: Uuid,
    cancel: AtomicBool,
    view: watch::Sender<JobView>,
    finished_at: Mutex<Option<Instant>>,
}

impl Job {
    /// A sample of libvirt's job statistics. One without a total (the job
    /// not started yet, or already gone) says nothing, and progress never
    /// goes back.
    fn progress(&self, p: Progress) {
        if p.total == 0 {
            return;
        }
        self.view.send_if_modified(|v| {
            let p = Progress {
                processed: p
                    .processed
                    .max(v.progress.processed)
                    .min(p.total.max(v.progress.total)),
                total: p.total.max(v.progress.total),
            };
            if v.outcome.is_none() && v.progress != p {
                v.progress = p;
                true
            } else {
                false
            }
        });
    }

    /// The dump is complete: all of it processed. `fallback_total` (the
    /// guest's RAM) when no sample came (a job faster than the polling).
    fn progress_complete(&self, fallback_total: u64) {
        self.view.send_if_modified(|v| {
            let total = if v.progress.total > 0 {
                v.progress.total
            } else {
                fallback_total
            };
            let p = Progress {
                processed: total,
                total,
            };
            if v.outcome.is_none() && v.progress != p {
                v.progress = p;
                true
            } else {
                false
            }
        });
    }

    /// libvirt finished the dump.
    fn dumped(&self) {
        self.view.send_if_modified(|v| {
            let end = v.progress.processed.max(v.progress.total);
            let changed = v.progress.processed != end || v.progress.total != end;
            v.progress = Progress {
                processed: end,
                total: end,
            };
            changed
        });
    }

    fn finish(&self, outcome: Result<SnapshotOutcome>) {
        *self.finished_at.lock().expect("job lock") = Some(Instant::now());
        self.view.send_modify(|v| {
            if let Ok(o) = &outcome {
                if v.progress.total > 0 {
                    let end = v.progress.total.max(v.progress.processed).max(o.dump_bytes);
                    v.progress = Progress {
                        processed: end,
                        total: end,
                    };
                }
            }
            v.outcome = Some(outcome)
        });
    }

    fn finished(&self) -> bool {
        self.finished_at.lock().expect("job lock").is_some()
    }

    pub fn expired(&self) -> bool {
        self.finished_at
            .lock()
            .expect("job lock")
            .is_some_and(|t| t.elapsed() > JOB_RETENTION)
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
}

/// The memory part of a snapshot, once its volumes are prepared.
pub(super) struct MemoryTarget {
    pub volumes: MemoryVolumes,
    pub dump: Prepared,
    pub dump_capacity: u64,
    pub meta: Prepared,
    pub meta_capacity: u64,
}

/// Tracks how long the guest was paused from polled observations.
#[derive(Default)]
struct PauseClock {
    last_seen: Option<(Instant, bool)>,
    paused_since: Option<Instant>,
    total: Duration,
    observations: u64,
}

impl PauseClock {
    fn observe(&mut self, at: Instant, paused: bool) {
        let mid = match self.last_seen {
            Some((prev, _)) => prev + (at - prev) / 2,
            None => at,
        };
        match (self.paused_since, paused) {
            (None, true) => self.paused_since = Some(mid),
            (Some(since), false) => {
                self.total += mid.saturating_duration_since(since);
                self.paused_since = None;
            }
            _ => {}
        }
        self.last_seen = Some((at, paused));
        self.observations += 1;
    }

    fn finish(&mut self, at: Instant) -> Duration {
        if let Some(since) = self.paused_since.take() {
            self.total += at.saturating_duration_since(since);
        }
        self.total
    }
}

/// What the job's monitor saw.
#[derive(Default)]
struct Watched {
    paused: Duration,
    /// The FILE dump outgrew its volume (and the job was aborted).
    too_large: bool,
}

impl Host {
    /// Starts (or joins) a snapshot job; its progress and outcome arrive on
    /// the returned receiver.
    pub async fn snapshot(&self, req: SnapshotRequest) -> Result<watch::Receiver<JobView>> {
        let mut jobs = self.inner.jobs.lock().expect("job table");
        if let Some(job) = jobs.get(&req.job_id) {
            if job.vm_id != req.vm_id || job.snapshot_id != req.snapshot_id {
                return Err(SnapshotError::JobConflict(req.job_id).into());
            }
            return Ok(job.view.subscribe());
        }
        let vm = self.vm(req.vm_id).ok_or(HostError::VmNotFound(req.vm_id))?;
        if vm.running().is_none() {
            return Err(SnapshotError::VmNotRunning(req.vm_id).into());
        }
        let op = vm
            .op
            .clone()
            .try_lock_owned()
            .map_err(|_| SnapshotError::VmBusy(req.vm_id))?;
        let total = if req.memory.is_some() {
            vm.running().map(|r| r.spec.memory_bytes).unwrap_or(0)
        } else {
            0
        };
        let job = Arc::new(Job {
            id: req.job_id,
            vm_id: req.vm_id,
            snapshot_id: req.snapshot_id,
            cancel: AtomicBool::new(false),
            view: watch::channel(JobView {
                progress: Progress { processed: 0, total },
                outcome: None,
            })
            .0,
            finished_at: Mutex::new(None),
        });
        jobs.insert(req.job_id, job.clone());
        drop(jobs);
        *vm.job.lock().expect("vm lock") = Some(job.clone());
        let rx = job.view.subscribe();
        let host = self.clone();
        // The job outlives the call that started it (a caller may go and
        // come back for it), and stays in the call's trace: its storage
        // calls carry that trace's context.
        let span = tracing::info_span!("snapshot_job", vm = %req.vm_id, snapshot = %req.snapshot_id);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let started = Instant::now();
                let outcome = host.take_snapshot(&vm, &job, &req).await.map(|mut o| {
                    o.duration_ms = started.elapsed().as_millis() as u64;
                    o
                });
                match &outcome {
                    Ok(o) => tracing::info!(
                        vm = %req.vm_id, snapshot = %req.snapshot_id, memory = o.memory_saved,
                        dump_bytes = o.dump_bytes, pause_ms = o.guest_pause_ms, ms = o.duration_ms,
                        "snapshot taken"
                    ),
                    Err(e) => {
                        tracing::warn!(vm = %req.vm_id, snapshot = %req.snapshot_id, error = %e, "snapshot failed")
                    }
                }
                vm.job.lock().expect("vm lock").take();
                job.finish(outcome);
                drop(op);
            },
            span,
        ));
        Ok(rx)
    }

    /// Cancels a running job and waits until it has cleaned up; false when
    /// no such job is running.
    pub async fn cancel_snapshot(&self, job_id: Uuid) -> Result<bool> {
        let job = self.inner.jobs.lock().expect("job table").get(&job_id).cloned();
        match job {
            Some(job) if !job.finished() => Ok(self.cancel_job(&job).await),
            _ => Ok(false),
        }
    }

    /// Cancels the job and waits for its end: true when it ended cancelled,
    /// false when it had gone past its last check and finished anyway (its
    /// snapshot stands).
    pub(crate) async fn cancel_job(&self, job: &Job) -> bool {
        job.cancel.store(true, Ordering::SeqCst);
        if let Err(e) = self.inner.hv.abort_job(job.vm_id).await {
            tracing::warn!(job = %job.id, error = %e, "abort_job failed; the job notices the cancel itself");
        }
        let mut rx = job.view.subscribe();
        let ended = rx.wait_for(|v| v.outcome.is_some()).await;
        ended.is_ok_and(|v| {
            matches!(
                v.outcome,
                Some(Err(HostError::Snapshot(SnapshotError::Cancelled(_))))
            )
        })
    }

    async fn take_snapshot(
        &self,
        vm: &Arc<Vm>,
        job: &Arc<Job>,
        req: &SnapshotRequest,
    ) -> Result<SnapshotOutcome> {
        let hv = &self.inner.hv;
        let volumes = &self.inner.volumes;
        let running = vm.running().ok_or(SnapshotError::VmNotRunning(req.vm_id))?;
        match hv.state(req.vm_id).await? {
            Some(DomainState::Running | DomainState::Paused { .. }) => {}
            _ => return Err(SnapshotError::VmNotRunning(req.vm_id).into()),
        }
        if vm.adopted.load(Ordering::SeqCst) {
            let earlier = self.resolve_earlier_attempt(vm, job, req, &running).await?;
            vm.adopted.store(false, Ordering::SeqCst);
            if let Some(outcome) = earlier {
                return Ok(outcome);
            }
        }
        if req.disks.len() != running.disks.len() {
            return Err(SnapshotError::DisksMismatch(format!(
                "the VM has {} disks, the request names {}",
                running.disks.len(),
                req.disks.len()
            ))
            .into());
        }
        for (d, r) in req.disks.iter().zip(&running.disks) {
            if d.current != r.leaf {
                return Err(SnapshotError::DisksMismatch(format!(
                    "disk {}: the VM runs on {}, the request names {}",
                    r.dev, r.leaf, d.current
                ))
                .into());
            }
            let info = volumes.get(&d.overlay).await?;
            let child = info.format == DiskFormat::Qcow2
                && info.parent == Some(d.current.volume)
                && d.overlay.domain == d.current.domain
                && d.overlay.image == d.current.image;
            if !child {
                return Err(SnapshotError::OverlayNotChild {
                    overlay: d.overlay,
                    current: d.current,
                }
                .into());
            }
        }
        // oVirt 3.3: below cluster level 3.3 the memory is never passed on.
        let memory = req.memory.filter(|_| req.level.has_memory_snapshots());

        let mut overlays: Vec<Prepared> = Vec::new();
        let mut mem: Option<MemoryTarget> = None;
        let mut lap = super::Lap::new(req.vm_id, "snapshot step");
        let prepared = self
            .prepare_snapshot(req, memory, &mut overlays, &mut mem, &mut lap)
            .await;
        lap.done("ready the dump volume");
        if let Err(e) = prepared {
            self.clean_up(vm, &overlays, mem.as_ref()).await;
            return Err(e);
        }
        if job.cancelled() {
            self.clean_up(vm, &overlays, mem.as_ref()).await;
            return Err(SnapshotError::Cancelled("before libvirt began").into());
        }

        let targets: Vec<DiskSource> = running
            .disks
            .iter()
            .zip(&overlays)
            .map(|(d, o)| DiskSource {
                dev: d.dev.clone(),
                kind: o.kind,
                path: o.path.display().to_string(),
                format: DiskFormat::Qcow2,
            })
            .collect();
        let dump_path = mem.as_ref().map(|m| m.dump.path.display().to_string());
        let snapshot_xml = xml::snapshot_xml(&req.snapshot_id.to_string(), dump_path.as_deref(), &targets);
        // ramsnap keeps the snapshot's metadata itself (NO_METADATA): libvirt's
        // would pin state on this host.
        let mut flags = sys::VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
            | sys::VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
            | sys::VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA;
        if self.inner.simulated {
            // libvirt's test driver (a simulated host) takes none of
            // REUSE_EXT, NO_METADATA and DISK_ONLY: it records the snapshot
            // in its own memory and writes no file, so the dump reads as
            // the zeros it was cleared to.
            flags = sys::VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC;
        }
        match (&mem, req.mode) {
            (None, _) if self.inner.simulated => {}
            (None, _) => flags |= sys::VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY,
            (Some(_), SnapshotMode::Live) => flags |= sys::VIR_DOMAIN_SNAPSHOT_CREATE_LIVE,
            (Some(_), SnapshotMode::Paused) => {}
        }
        if mem.is_some() {
            vm.set_status(VmStatus::SavingState);
        }

        let (stop_tx, stop_rx) = watch::channel(false);
        let file_limit = mem
            .as_ref()
            .filter(|m| m.dump.kind == DiskKind::File)
            .map(|m| (m.dump.path.clone(), m.dump_capacity));
        let monitor = tokio::spawn(watch_job(self.clone(), job.clone(), file_limit, stop_rx));
        // The dump is hashed while QEMU writes it (see follow_dump and
        // follow_block_dump).
        let stop_following = Arc::new(AtomicBool::new(false));
        let _stop_following_on_drop = metadata::StopOnDrop(stop_following.clone());
        let follower = mem.as_ref().filter(|_| !self.inner.simulated).map(|m| {
            let (path, capacity, stop) = (m.dump.path.clone(), m.dump_capacity, stop_following.clone());
            let kind = m.dump.kind;
            tokio::task::spawn_blocking(move || match kind {
                DiskKind::File => metadata::follow_dump(&path, capacity, &stop),
                DiskKind::Block => metadata::follow_block_dump(&path, capacity, &stop),
            })
        });
        let mut libvirt_started = Instant::now();
        let result = if self.inner.simulated && mem.is_none() {
            // The test driver takes external disk snapshots only with a
            // memory snapshot; a simulated host's disk-only snapshot is the
            // switch of its disk record alone.
            Ok(())
        } else {
            libvirt_started = Instant::now();
            if crate::failpoint::hit("snapshot_during_dump") {
                hv.exit_once_a_job_runs(req.vm_id).await;
            }
            hv.snapshot(
                req.vm_id,
                snapshot_xml,
                flags,
                snapshot_timeout(running.spec.memory_bytes),
            )
            .await
        };
        let libvirt_took = libvirt_started.elapsed();
        lap.done("libvirt snapshot");
        let _ = stop_tx.send(true);
        stop_following.store(true, Ordering::Release);
        let followed = match follower {
            Some(f) => match f.await {
                Ok(Ok(f)) => Some(f),
                Ok(Err(e)) => {
                    tracing::debug!(vm = %req.vm_id, error = %e, "hashing the dump while it was written failed; hashed after");
                    None
                }
                Err(_) => None,
            },
            None => None,
        };
        let watched = monitor.await.unwrap_or_default();
        let completed = if mem.is_some() {
            hv.completed_job(req.vm_id)
                .await
                .ok()
                .flatten()
                .unwrap_or_default()
        } else {
            CompletedJob::default()
        };
        let downtime = completed.downtime_ms.unwrap_or(0);
        let guest_pause_ms = (watched.paused.as_millis() as u64).max(downtime);
        tracing::info!(
            vm = %req.vm_id, pause_ms = watched.paused.as_millis() as u64,
            qemu_downtime_ms = downtime, "guest pause"
        );

        if let Err(e) = result {
            if matches!(e, HostError::Timeout { .. }) {
                // The call gave up, libvirt's job may not have: stop it
                // before the clean-up takes its files away.
                let deadline = Instant::now() + Duration::from_secs(60);
                while Instant::now() < deadline {
                    let _ = hv.abort_job(req.vm_id).await;
                    if !matches!(hv.job_progress(req.vm_id).await, Ok(Some(_))) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            self.clean_up(vm, &overlays, mem.as_ref()).await;
            if job.cancelled() {
                return Err(SnapshotError::Cancelled("libvirt's job was aborted").into());
            }
            if let Some(m) = &mem {
                let enospc =
                    matches!(&e, HostError::Libvirt(l) if l.message.contains("No space left on device"));
                if watched.too_large || enospc {
                    return Err(SnapshotError::DumpTooLarge {
                        volume: m.volumes.dump,
                        capacity: m.dump_capacity,
                    }
                    .into());
                }
            }
            if let HostError::Libvirt(l) = &e {
                if l.kind == LibvirtErrorKind::Aborted {
                    return Err(SnapshotError::Cancelled("libvirt's job was aborted").into());
                }
            }
            return Err(e);
        }

        // libvirt switched the disks: from here on, a failure merges them back.
        // The dump is written: the guest is no longer saving its state.
        if mem.is_some() {
            job.progress_complete(running.spec.memory_bytes);
            job.dumped();
            vm.transition(Some(VmStatus::SavingState), VmStatus::Up);
        }
        let finished = self
            .finish_snapshot(
                job,
                req,
                &running.disks,
                &overlays,
                mem.as_ref(),
                followed,
                completed.memory_bytes,
                guest_pause_ms,
            )
            .await;
        lap.done("checksum and metadata");
        match finished {
            Ok(outcome) => {
                if outcome.memory_saved {
                    let mode = match req.mode {
                        SnapshotMode::Live => "live",
                        SnapshotMode::Paused => "paused",
                    };
                    ramsnap_common::metrics::record_dump(
                        mode,
                        libvirt_took.as_secs_f64(),
                        outcome.dump_bytes,
                        outcome.guest_pause_ms as f64 / 1000.0,
                    );
                }
                let mut r = running.clone();
                for (d, o) in r.disks.iter_mut().zip(&overlays) {
                    adopt(d, o);
                }
                self.record(vm, r).await;
                if let Some(m) = &mem {
                    volumes.teardown_all(&[m.volumes.dump, m.volumes.metadata]).await;
                }
                vm.transition(Some(VmStatus::SavingState), VmStatus::Up);
                Ok(outcome)
            }
            Err(e) => {
                let mut reverted = true;
                for d in &running.disks {
                    if let Err(ce) = hv
                        .commit_active_layer(req.vm_id, d.dev.clone(), COMMIT_TIMEOUT)
                        .await
                    {
                        tracing::error!(vm = %req.vm_id, disk = %d.dev, error = %ce, "merging the overlay back failed");
                        reverted = false;
                    }
                }
                if reverted {
                    // The guest wrote to the overlays until the merge: empty
                    // them again, so that they can be used for the snapshot
                    // once more (libvirt reuses them as they are).
                    let mut e = e;
                    for o in &overlays {
                        if let Err(re) = reset_overlay(o.path.clone()).await {
                            tracing::error!(vm = %req.vm_id, overlay = %o.r, error = %re, "emptying an overlay failed");
                            e = HostError::Internal(format!(
                                "{e}; and overlay {} could not be emptied ({re}): create a new one",
                                o.r
                            ));
                        }
                    }
                    self.clean_up(vm, &overlays, mem.as_ref()).await;
                    Err(e)
                } else {
                    // The VM stays on the overlays: record them, so that a
                    // stop tears them down, and say so.
                    let mut r = running.clone();
                    for (d, o) in r.disks.iter_mut().zip(&overlays) {
                        adopt(d, o);
                    }
                    self.record(vm, r).await;
                    if let Some(m) = &mem {
                        let _ = scrub(m).await;
                        volumes.teardown_all(&[m.volumes.dump, m.volumes.metadata]).await;
                    }
                    vm.transition(Some(VmStatus::SavingState), VmStatus::Up);
                    Err(HostError::Internal(format!(
                        "{e}; and the disks could not be switched back, the VM runs on the overlays"
                    )))
                }
            }
        }
    }

    /// An earlier agent process may have begun this very snapshot and died
    /// while libvirt went on without it. Before anything is prepared or
    /// scrubbed: wait until libvirt is done with the domain, then look where
    /// the disks point. On the request's overlays, the snapshot was taken:
    /// it is finished here (memory checksummed and recorded) and reported
    /// as taken, never taken again or undone. None: it was not taken.
    async fn resolve_earlier_attempt(
        &self,
        vm: &Arc<Vm>,
        job: &Job,
        req: &SnapshotRequest,
        running: &super::Running,
    ) -> Result<Option<SnapshotOutcome>> {
        let hv = &self.inner.hv;
        let volumes = &self.inner.volumes;
        // A job the earlier process began may still run: what it does to
        // the disks is known only once it has ended.
        if !self.inner.simulated {
            hv.wait_for_jobs(req.vm_id, snapshot_timeout(running.spec.memory_bytes))
                .await?;
        }
        if req.disks.len() != running.disks.len() {
            return Ok(None); // the usual checks say what is wrong
        }
        let live = if self.inner.simulated {
            Vec::new()
        } else {
            self.live_disks(req.vm_id).await?
        };
        let live_path = |dev: &str| live.iter().find(|(d, _)| d == dev).map(|(_, p)| p.clone());
        let moved = |d: &crate::model::SnapshotDisk, r: &RunningDisk| {
            r.leaf == d.overlay || live_path(&r.dev).is_some_and(|p| p != r.path)
        };
        let n_moved = req
            .disks
            .iter()
            .zip(&running.disks)
            .filter(|(d, r)| moved(d, r))
            .count();
        if n_moved == 0 {
            return Ok(None);
        }
        // Every disk must now be on its overlay (libvirt's snapshot is atomic).
        let mut overlays = Vec::new();
        for (d, r) in req.disks.iter().zip(&running.disks) {
            let o = volumes.prepare(&d.overlay).await?;
            let on_overlay =
                r.leaf == d.overlay || live_path(&r.dev).is_some_and(|p| p == o.path.display().to_string());
            if !on_overlay {
                return Err(SnapshotError::DisksMismatch(format!(
                    "disk {} runs on neither its leaf {} nor the snapshot's overlay {}",
                    r.dev, d.current, d.overlay
                ))
                .into());
            }
            overlays.push(o);
        }
        tracing::warn!(vm = %req.vm_id, snapshot = %req.snapshot_id,
            "the snapshot was taken by an earlier attempt: finishing it");
        // What the disks were before the snapshot, for the memory's metadata.
        let before: Vec<RunningDisk> = running
            .disks
            .iter()
            .zip(&req.disks)
            .map(|(r, d)| RunningDisk {
                leaf: d.current,
                ..r.clone()
            })
            .collect();
        let memory = req.memory.filter(|_| req.level.has_memory_snapshots());
        let outcome = match memory {
            None => SnapshotOutcome {
                memory_saved: false,
                dump_bytes: 0,
                dump_checksum: None,
                guest_pause_ms: 0,
                duration_ms: 0,
            },
            Some(m) => self.adopt_memory(job, req, &before, &overlays, m).await,
        };
        let mut r = running.clone();
        for (d, o) in r.disks.iter_mut().zip(&overlays) {
            if d.leaf != o.r {
                adopt(d, o);
            }
        }
        self.record(vm, r).await;
        // The status this agent found at start may be the pause of that
        // job: libvirt's state now says what the guest does.
        let paused = matches!(
            self.inner.hv.state(vm.id).await,
            Ok(Some(DomainState::Paused { by_user: true }))
        );
        vm.set_status(if paused { VmStatus::Paused } else { VmStatus::Up });
        Ok(Some(outcome))
    }

    /// The memory part of a snapshot that libvirt took for an earlier agent
    /// process: already recorded (the metadata volume names this snapshot),
    /// or a complete save image to checksum and record now. Anything else is
    /// no memory: the volumes are cleared and the snapshot is disk-only.
    async fn adopt_memory(
        &self,
        job: &Job,
        req: &SnapshotRequest,
        before: &[RunningDisk],
        overlays: &[Prepared],
        m: MemoryVolumes,
    ) -> SnapshotOutcome {
        let volumes = &self.inner.volumes;
        let disk_only = SnapshotOutcome {
            memory_saved: false,
            dump_bytes: 0,
            dump_checksum: None,
            guest_pause_ms: 0,
            duration_ms: 0,
        };
        let target = match self.prepare_memory(m).await {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(vm = %req.vm_id, error = %e, "preparing the memory volumes of a snapshot taken earlier failed; it is kept without memory");
                return disk_only;
            }
        };
        let recorded = match super::run::read_memory_metadata(&target.meta, target.meta_capacity).await {
            Ok(md) if md.snapshot_id == req.snapshot_id && md.vm_id == req.vm_id => Some(SnapshotOutcome {
                memory_saved: true,
                dump_bytes: md.dump.dump_bytes,
                dump_checksum: Some(md.dump.checksum),
                guest_pause_ms: 0,
                duration_ms: 0,
            }),
            _ => None,
        };
        let outcome = match recorded {
            Some(o) => Ok(o),
            None if self.inner.simulated => {
                Err(HostError::Internal("no save image on a simulated host".into()))
            }
            None => match self
                .inner
                .hv
                .saved_xml(target.dump.path.display().to_string())
                .await
            {
                Ok(_) => {
                    self.finish_snapshot(job, req, before, overlays, Some(&target), None, None, 0)
                        .await
                }
                Err(e) => Err(e),
            },
        };
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(vm = %req.vm_id, snapshot = %req.snapshot_id, error = %e,
                    "the memory of the snapshot taken earlier is not usable: the snapshot is kept without it");
                scrub_pair(&target, req.vm_id).await;
                disk_only
            }
        };
        volumes.teardown_all(&[m.dump, m.metadata]).await;
        outcome
    }

    /// Prepares a memory pair and reads their capacities (no scrub). The
    /// two volumes (in images of their own) side by side, each checked
    /// and prepared in one call.
    pub(super) async fn prepare_memory(&self, m: MemoryVolumes) -> Result<MemoryTarget> {
        let volumes = &self.inner.volumes;
        let (dump, meta) = match tokio::join!(
            volumes.prepare_of(&m.dump, Purpose::MemoryDump),
            volumes.prepare_of(&m.metadata, Purpose::MemoryMetadata)
        ) {
            (Ok(d), Ok(mt)) => (d, mt),
            (Ok(_), Err(e)) => {
                volumes.teardown_all(&[m.dump]).await;
                return Err(e);
            }
            (Err(e), Ok(_)) => {
                volumes.teardown_all(&[m.metadata]).await;
                return Err(e);
            }
            (Err(e), Err(_)) => return Err(e),
        };
        let ((dump, dump_info), (meta, meta_info)) = (dump, meta);
        Ok(MemoryTarget {
            volumes: m,
            dump,
            dump_capacity: dump_info.capacity,
            meta,
            meta_capacity: meta_info.capacity.min(metadata::MAX_DOCUMENT),
        })
    }

    async fn prepare_snapshot(
        &self,
        req: &SnapshotRequest,
        memory: Option<MemoryVolumes>,
        overlays: &mut Vec<Prepared>,
        mem: &mut Option<MemoryTarget>,
        lap: &mut super::Lap,
    ) -> Result<()> {
        // The overlays and the memory pair side by side: each prepare is a
        // call to the storage service, and on BLOCK a few LVM commands.
        let volumes = &self.inner.volumes;
        let disks = futures::future::join_all(req.disks.iter().map(|d| volumes.prepare(&d.overlay)));
        let pair = async {
            match memory {
                Some(m) => Some(self.prepare_memory(m).await),
                None => None,
            }
        };
        let (disks, pair) = tokio::join!(disks, pair);
        lap.done("prepare volumes");
        // What was prepared is recorded (for the clean-up) before any
        // error is returned.
        let mut failed = None;
        for r in disks {
            match r {
                Ok(p) => overlays.push(p),
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        match pair {
            Some(Ok(t)) => *mem = Some(t),
            Some(Err(e)) => {
                failed.get_or_insert(e);
            }
            None => {}
        }
        if let Some(e) = failed {
            return Err(e);
        }
        match mem.as_ref() {
            Some(target) => ready_dump(target, req.vm_id, req.snapshot_id).await,
            None => Ok(()),
        }
    }

    /// After libvirt's part succeeded: checks, checksum, metadata volume.
    #[allow(clippy::too_many_arguments)]
    async fn finish_snapshot(
        &self,
        job: &Job,
        req: &SnapshotRequest,
        disks: &[RunningDisk],
        overlays: &[Prepared],
        mem: Option<&MemoryTarget>,
        followed: Option<Followed>,
        memory_bytes: Option<u64>,
        guest_pause_ms: u64,
    ) -> Result<SnapshotOutcome> {
        if job.cancelled() {
            return Err(
                SnapshotError::Cancelled("after libvirt had finished; the disks were merged back").into(),
            );
        }
        let Some(m) = mem else {
            return Ok(SnapshotOutcome {
                memory_saved: false,
                dump_bytes: 0,
                dump_checksum: None,
                guest_pause_ms: 0,
                duration_ms: 0,
            });
        };
        let path = m.dump.path.clone();
        let capacity = m.dump_capacity;
        let during = followed.as_ref().map_or(0, |f| f.bytes());
        let t = Instant::now();
        let digest = tokio::task::spawn_blocking(move || {
            metadata::digest_dump(&path, capacity, followed.as_ref(), memory_bytes)
        })
        .await
        .map_err(|e| HostError::Internal(e.to_string()))?
        .map_err(|e| HostError::io("checksumming the memory dump", e))?;
        tracing::debug!(
            vm = %req.vm_id, bytes = digest.len, hashed_during_dump = during,
            ms = t.elapsed().as_millis() as u64, "finish: checksum"
        );
        let t = Instant::now();
        // A FILE dump grows past the volume's capacity instead of failing:
        // that dump would not survive a copy, so the snapshot fails.
        if digest.len > capacity {
            return Err(SnapshotError::DumpTooLarge {
                volume: m.volumes.dump,
                capacity,
            }
            .into());
        }
        let dump_bytes = match m.dump.kind {
            DiskKind::File => digest.len,
            DiskKind::Block => digest.data_end,
        };
        let domain_xml = if self.inner.simulated {
            // The test driver wrote no save image: its live definition.
            self.inner.hv.live_xml(req.vm_id).await?
        } else {
            self.inner.hv.saved_xml(m.dump.path.display().to_string()).await?
        };
        tracing::debug!(vm = %req.vm_id, ms = t.elapsed().as_millis() as u64, "finish: domain xml");
        let t = Instant::now();
        let md = MemoryMetadata {
            format: metadata::FORMAT.into(),
            version: metadata::VERSION,
            vm_id: req.vm_id,
            snapshot_id: req.snapshot_id,
            created_at: chrono_now(),
            mode: req.mode,
            disks: disks
                .iter()
                .zip(overlays)
                .map(|(d, o)| DiskRecord {
                    current: d.leaf,
                    overlay: o.r,
                })
                .collect(),
            dump: DumpRecord {
                volume: m.volumes.dump,
                capacity,
                dump_bytes,
                checksum: digest.checksum,
            },
            domain_xml,
        };
        let bytes = md
            .encode(m.meta_capacity)
            .ok_or(SnapshotError::MetadataTooLarge {
                size: md.encoded_len(),
                capacity: m.meta_capacity,
            })?;
        let meta_path = m.meta.path.clone();
        tokio::task::spawn_blocking(move || metadata::write_volume(&meta_path, &bytes))
            .await
            .map_err(|e| HostError::Internal(e.to_string()))?
            .map_err(|e| HostError::io("writing the memory metadata", e))?;
        tracing::debug!(vm = %req.vm_id, ms = t.elapsed().as_millis() as u64, "finish: metadata written");
        // A cancel that came during the checksum still undoes the snapshot
        // (the clean-up zeroes the metadata volume again).
        if job.cancelled() {
            return Err(
                SnapshotError::Cancelled("after libvirt had finished; the disks were merged back").into(),
            );
        }
        Ok(SnapshotOutcome {
            memory_saved: true,
            dump_bytes,
            dump_checksum: Some(digest.checksum),
            guest_pause_ms,
            duration_ms: 0,
        })
    }

    /// Undoes the host side of a snapshot that did not happen: overlays
    /// torn down (and the VM's own leaves prepared again, since a teardown
    /// releases the chain beneath), the dump scrubbed, memory volumes torn
    /// down, status back to what libvirt says.
    async fn clean_up(&self, vm: &Arc<Vm>, overlays: &[Prepared], mem: Option<&MemoryTarget>) {
        let volumes = &self.inner.volumes;
        let refs: Vec<VolumeRef> = overlays.iter().map(|p| p.r).collect();
        volumes.teardown_all(&refs).await;
        if !overlays.is_empty() {
            if let Some(r) = vm.running() {
                for d in &r.disks {
                    if let Err(e) = volumes.prepare(&d.leaf).await {
                        tracing::error!(vm = %vm.id, volume = %d.leaf, error = %e, "re-preparing a disk failed");
                    }
                }
            }
        }
        if let Some(m) = mem {
            scrub_pair(m, vm.id).await;
            volumes.teardown_all(&[m.volumes.dump, m.volumes.metadata]).await;
        }
        let paused = matches!(
            self.inner.hv.state(vm.id).await,
            Ok(Some(DomainState::Paused { by_user: true }))
        );
        vm.transition(
            Some(VmStatus::SavingState),
            if paused { VmStatus::Paused } else { VmStatus::Up },
        );
    }

    /// Stores the VM's new record here and in the domain's metadata.
    pub(super) async fn record(&self, vm: &Arc<Vm>, running: super::Running) {
        let element = running.metadata_body();
        *vm.running.lock().expect("vm lock") = Some(running);
        if let Err(e) = self.inner.hv.set_metadata(vm.id, element).await {
            tracing::warn!(vm = %vm.id, error = %e, "updating the domain's ramsnap record failed");
        }
    }
}

fn adopt(d: &mut RunningDisk, o: &Prepared) {
    d.leaf = o.r;
    d.path = o.path.display().to_string();
    d.kind = o.kind;
    d.format = DiskFormat::Qcow2;
    d.prepared.push(o.r);
}

pub(super) fn chrono_now() -> i64 {
    crate::model::now_unix_ms() / 1000
}

/// Readies the dump volume for libvirt: it must read as zeros (the
/// checksum covers its whole capacity), and the pair is marked as being
/// written before anything writes it. A BLOCK pair that is clean (see
/// `metadata::pair_is_clean`: as the storage service made it, zeroed) is
/// not zeroed again: that is a full pass over the LV (about a second per
/// GiB here). A FILE dump is always truncated, which costs nothing.
pub(super) async fn ready_dump(m: &MemoryTarget, vm_id: Uuid, snapshot_id: Uuid) -> Result<()> {
    let (dump, meta) = (m.dump.clone(), m.meta.clone());
    let (capacity, meta_capacity) = (m.dump_capacity, m.meta_capacity);
    let scrubbed = blocking_io("readying the dump volume".into(), move || {
        let clean = dump.kind == DiskKind::Block && metadata::pair_is_clean(&meta.path)?;
        if !clean {
            scrub_dump(&dump, capacity)?;
        }
        metadata::mark_dump_in_progress(&meta.path, meta_capacity, vm_id, snapshot_id)?;
        Ok(!clean)
    })
    .await?;
    tracing::debug!(vm = %vm_id, dump = %m.volumes.dump, scrubbed, "dump volume ready");
    Ok(())
}

/// Makes a pair clean again after a dump that is not kept: the dump
/// scrubbed, then the metadata zeroed. Only in that order, and the
/// metadata only when the scrub succeeded: zero metadata says the dump
/// reads as zeros (see `ready_dump`).
pub(super) async fn scrub_pair(m: &MemoryTarget, vm: Uuid) {
    if let Err(e) = scrub(m).await {
        tracing::error!(vm = %vm, error = %e, "scrubbing the dump volume failed; its metadata volume keeps its mark");
        return;
    }
    let (path, capacity) = (m.meta.path.clone(), m.meta_capacity);
    let zeroed = blocking_io("zeroing the memory metadata".into(), move || {
        metadata::write_volume(&path, &vec![0u8; capacity as usize])
    })
    .await;
    if let Err(e) = zeroed {
        tracing::error!(vm = %vm, error = %e, "zeroing the metadata volume failed");
    }
}

/// Makes the dump volume read as zeros (see [`scrub_dump`]).
async fn scrub(m: &MemoryTarget) -> Result<()> {
    let (dump, capacity) = (m.dump.clone(), m.dump_capacity);
    blocking_io("scrubbing the memory dump".into(), move || {
        scrub_dump(&dump, capacity)
    })
    .await
}

/// libvirt may have unlinked a FILE dump after a failure: the volume's
/// file is made again, empty.
fn scrub_dump(dump: &Prepared, capacity: u64) -> std::io::Result<()> {
    if dump.kind == DiskKind::File && !dump.path.exists() {
        std::fs::File::create(&dump.path)?;
    }
    metadata::scrub_dump(&dump.path, capacity)
}

/// Makes a qcow2 overlay empty again, in place: the same virtual size,
/// cluster size and backing file (as the storage service wrote them, read
/// from the overlay itself), no data. QEMU may hold its lock for a moment
/// after the pivot: retried.
async fn reset_overlay(path: PathBuf) -> std::result::Result<(), String> {
    tokio::task::spawn_blocking(move || {
        use std::process::Command;
        let out = Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(&path)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        let size = info["virtual-size"].as_u64().ok_or("no virtual-size")?;
        let cluster = info["cluster-size"].as_u64().unwrap_or(65536);
        let backing = info["backing-filename"].as_str().map(str::to_string);
        let backing_fmt = info["backing-filename-format"]
            .as_str()
            .unwrap_or("qcow2")
            .to_string();
        let mut last = String::new();
        for _ in 0..50 {
            let mut cmd = Command::new("qemu-img");
            if let Some(dir) = path.parent() {
                cmd.current_dir(dir);
            }
            cmd.args(["create", "-q", "-f", "qcow2", "-u"]);
            if let Some(b) = &backing {
                cmd.args(["-b", b, "-F", &backing_fmt]);
            }
            cmd.args(["-o", &format!("cluster_size={cluster}")])
                .arg(&path)
                .arg(size.to_string());
            let out = cmd.output().map_err(|e| e.to_string())?;
            if out.status.success() {
                return Ok(());
            }
            last = String::from_utf8_lossy(&out.stderr).trim().to_string();
            if !last.contains("lock") {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(last)
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Runs beside the libvirt call until `stop`. Two loops, because a job
/// stats query can wait behind the snapshot job while a state query never
/// does: one polls the domain state every 5 ms for the pause clock and
/// keeps aborting the job once it is cancelled (or the dump too large);
/// the other polls the job stats for progress and a FILE dump's size
/// against its volume.
async fn watch_job(
    host: Host,
    job: Arc<Job>,
    file_limit: Option<(PathBuf, u64)>,
    stop: watch::Receiver<bool>,
) -> Watched {
    let hv = &host.inner.hv;
    let id = job.vm_id;
    let too_large = AtomicBool::new(false);
    let sleep_or_stop = |mut stop: watch::Receiver<bool>, d: Duration| async move {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = stop.changed() => {}
        }
    };

    let state_poll = if hv.pause_events().is_some() {
        STATE_POLL_WITH_EVENTS
    } else {
        STATE_POLL
    };
    let states = async {
        let mut clock = PauseClock::default();
        let mut abort_sent = false;
        let mut slowest = Duration::ZERO;
        while !*stop.borrow() {
            let t = Instant::now();
            if let Ok(Some(state)) = hv.state(id).await {
                clock.observe(Instant::now(), matches!(state, DomainState::Paused { .. }));
            }
            slowest = slowest.max(t.elapsed());
            // Checked this often so that the job is aborted while it writes,
            // not merged back after it finished.
            if let Some((path, capacity)) = &file_limit {
                if !too_large.load(Ordering::SeqCst)
                    && std::fs::metadata(path)
                        .map(|m| m.len() > *capacity)
                        .unwrap_or(false)
                {
                    tracing::warn!(vm = %id, capacity, "the memory dump outgrew its volume; aborting");
                    too_large.store(true, Ordering::SeqCst);
                }
            }
            if (job.cancelled() || too_large.load(Ordering::SeqCst)) && !abort_sent {
                // false: libvirt's job has not begun yet; again next round.
                if let Ok(true) = hv.abort_job(id).await {
                    abort_sent = true;
                }
            }
            sleep_or_stop(stop.clone(), state_poll).await;
        }
        let end = Instant::now();
        if let Ok(Some(state)) = hv.state(id).await {
            clock.observe(end, matches!(state, DomainState::Paused { .. }));
        }
        tracing::debug!(vm = %id, observations = clock.observations, slowest_ms = slowest.as_millis() as u64, "job watch ended");
        clock.finish(end)
    };

    let progress = async {
        while !*stop.borrow() {
            if let Ok(Some(p)) = hv.job_progress(id).await {
                job.progress(Progress {
                    processed: p.processed,
                    total: p.total.max(p.processed),
                });
            }
            sleep_or_stop(stop.clone(), PROGRESS_POLL).await;
        }
    };

    if let Some(ev) = hv.pause_events() {
        ev.watch(id);
    }
    let (polled, ()) = tokio::join!(states, progress);
    let paused = match hv.pause_events() {
        Some(ev) => {
            // The RESUMED event can arrive just after the call returned.
            let deadline = Instant::now() + Duration::from_millis(500);
            while ev.seen(id).last().is_some_and(|&(_, paused)| paused) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let events = ev.take(id);
            let total = crate::libvirt::pauses::paused_total(&events, Instant::now());
            tracing::debug!(vm = %id, events = events.len(), event_ms = total.as_millis() as u64,
                polled_ms = polled.as_millis() as u64, "guest pause measured");
            if events.is_empty() {
                polled
            } else {
                total
            }
        }
        None => polled,
    };
    Watched {
        paused,
        too_large: too_large.load(Ordering::SeqCst),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_clock_counts_from_midpoints() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut c = PauseClock::default();
        c.observe(ms(0), false);
        c.observe(ms(10), true); // paused since ~5
        c.observe(ms(20), true);
        c.observe(ms(30), false); // resumed ~25
        c.observe(ms(40), true); // paused since ~35
        assert_eq!(c.finish(ms(45)), Duration::from_millis(30));
    }
}
