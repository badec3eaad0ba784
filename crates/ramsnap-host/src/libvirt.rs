//! Every libvirt call the host makes, behind a small typed API. libvirt
//! calls block, so each runs on the blocking pool with a timeout; a broken
//! connection (libvirtd restarted) is reopened on the next call. Domains are
//! looked up by UUID, which is the VM id.
use crate::error::{HostError, LibvirtError, LibvirtErrorKind, Result};
use std::ffi::CString;
use std::ops::ControlFlow;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use uuid::Uuid;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;

pub mod pauses;

/// Timeout of calls that should answer at once.
pub const QUICK: Duration = Duration::from_secs(30);

/// The XML namespace of the host agent's element in a domain's <metadata>.
pub const METADATA_NS: &str = "https://ramsnap.dev/xmlns/host/1";
pub const METADATA_KEY: &str = "ramsnap";

/// What the host reports about its hypervisor.
#[derive(Debug, Clone)]
pub struct Facts {
    pub hostname: String,
    /// libvirt's driver name: "QEMU", "Test", ...
    pub driver: String,
    /// major * 1_000_000 + minor * 1000 + release.
    pub lib_version: u32,
    pub hyp_version: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainState {
    Running,
    /// `by_user`: paused by a user or an error, not by a job of ours
    /// (snapshot, save, migration, start).
    Paused {
        by_user: bool,
    },
    ShuttingDown,
    ShutOff,
    Crashed,
    Other,
}

/// A running domain as listed.
#[derive(Debug, Clone)]
pub struct DomainEntry {
    pub uuid: Uuid,
    pub name: String,
    pub state: DomainState,
    /// The host agent's metadata element, when the domain has one.
    pub metadata: Option<String>,
}

/// Bytes processed and total of the domain's running job.
#[derive(Debug, Clone, Copy, Default)]
pub struct JobProgress {
    pub processed: u64,
    pub total: u64,
}

pub struct Hypervisor {
    uri: String,
    conn: Mutex<Option<Connect>>,
    pauses: Option<pauses::PauseEvents>,
}

trait VirtResult<T> {
    fn lv(self, op: &'static str) -> Result<T>;
}

impl<T> VirtResult<T> for std::result::Result<T, virt::error::Error> {
    fn lv(self, op: &'static str) -> Result<T> {
        self.map_err(|e| HostError::Libvirt(LibvirtError::from_virt(op, &e)))
    }
}

fn last_error(op: &'static str) -> HostError {
    HostError::Libvirt(LibvirtError::from_virt(op, &virt::error::Error::last_error()))
}

fn cstring(op: &'static str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| HostError::Internal(format!("libvirt {op}: argument contains NUL")))
}

fn lookup(c: &Connect, id: Uuid, op: &'static str) -> Result<Domain> {
    c.lookup_domain_by_uuid_string(&id.to_string()).lv(op)
}

/// The block job on `disk`, or None when none runs.
fn block_job_info(d: &Domain, disk: &CString) -> Result<Option<sys::virDomainBlockJobInfo>> {
    let mut info = std::mem::MaybeUninit::<sys::virDomainBlockJobInfo>::zeroed();
    // SAFETY: `d` is a live domain handle, `disk` outlives the call and
    // `info` is written by it.
    let r = unsafe { sys::virDomainGetBlockJobInfo(d.as_ptr(), disk.as_ptr(), info.as_mut_ptr(), 0) };
    if r < 0 {
        return Err(last_error("block_job_info"));
    }
    // SAFETY: r > 0: libvirt filled `info`.
    Ok((r > 0).then(|| unsafe { info.assume_init() }))
}

/// Samples `disk`'s block job every `every` and hands each sample (None
/// once no job runs) to `step` until it breaks with a result; None when
/// `deadline` passes first. The one polling loop of every block job.
fn poll_block_job<T>(
    d: &Domain,
    disk: &CString,
    deadline: Instant,
    every: Duration,
    mut step: impl FnMut(Option<&sys::virDomainBlockJobInfo>) -> ControlFlow<Result<T>>,
) -> Option<Result<T>> {
    loop {
        let sample = match block_job_info(d, disk) {
            Ok(s) => s,
            Err(e) => return Some(Err(e)),
        };
        if let ControlFlow::Break(r) = step(sample.as_ref()) {
            return Some(r);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// Ends `disk`'s block job: with `pivot`, onto its new image (an active
/// commit or copy that is ready), else by cancelling it.
fn end_block_job(d: &Domain, disk: &CString, pivot: bool) -> Result<()> {
    let flags = if pivot {
        sys::VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT
    } else {
        0
    };
    // SAFETY: `d` is a live domain handle; `disk` outlives the call.
    let r = unsafe { sys::virDomainBlockJobAbort(d.as_ptr(), disk.as_ptr(), flags) };
    if r < 0 {
        return Err(last_error(if pivot {
            "block_job_pivot"
        } else {
            "block_job_abort"
        }));
    }
    Ok(())
}

/// A pivot that came before QEMU reported the job ready: OPERATION_INVALID
/// on older libvirt, BLOCK_COPY_ACTIVE on newer. Worth asking again.
fn pivot_not_ready(e: &HostError) -> bool {
    matches!(e, HostError::Libvirt(l) if matches!(
        l.kind,
        LibvirtErrorKind::OperationInvalid | LibvirtErrorKind::BlockJobNotReady
    ))
}

fn state_of(d: &Domain, op: &'static str) -> Result<DomainState> {
    let mut state: libc::c_int = -1;
    let mut reason: libc::c_int = -1;
    // The virt wrapper drops errors here; call libvirt directly to see them.
    let r = unsafe { sys::virDomainGetState(d.as_ptr(), &mut state, &mut reason, 0) };
    if r < 0 {
        return Err(last_error(op));
    }
    Ok(classify(state as u32, reason as u32))
}

fn classify(state: u32, reason: u32) -> DomainState {
    match state {
        sys::VIR_DOMAIN_RUNNING | sys::VIR_DOMAIN_BLOCKED => DomainState::Running,
        sys::VIR_DOMAIN_PAUSED => DomainState::Paused {
            by_user: !matches!(
                reason,
                sys::VIR_DOMAIN_PAUSED_MIGRATION
                    | sys::VIR_DOMAIN_PAUSED_SAVE
                    | sys::VIR_DOMAIN_PAUSED_DUMP
                    | sys::VIR_DOMAIN_PAUSED_SNAPSHOT
                    | sys::VIR_DOMAIN_PAUSED_STARTING_UP
                    | sys::VIR_DOMAIN_PAUSED_FROM_SNAPSHOT
                    | sys::VIR_DOMAIN_PAUSED_SHUTTING_DOWN
            ),
        },
        sys::VIR_DOMAIN_SHUTDOWN => DomainState::ShuttingDown,
        sys::VIR_DOMAIN_SHUTOFF => DomainState::ShutOff,
        sys::VIR_DOMAIN_CRASHED => DomainState::Crashed,
        _ => DomainState::Other,
    }
}

/// The figures of a domain's completed job that ramsnap uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompletedJob {
    /// The guest's downtime (ms), as QEMU measured it.
    pub downtime_ms: Option<u64>,
    /// How many bytes of guest memory QEMU's migration stream carried
    /// (`memory_processed`): for a memory dump, the stream after libvirt's
    /// header up to the device state, which follows it (measured on QEMU
    /// 7.2 / libvirt 9.0: a 378,254,393-byte stream, 378,167,157 bytes of
    /// memory).
    pub memory_bytes: Option<u64>,
}

/// A domain's job statistics (typed parameters), freed on drop.
struct JobStats {
    params: sys::virTypedParameterPtr,
    n: libc::c_int,
}

impl JobStats {
    fn get(&self, name: &str) -> Option<u64> {
        let name = CString::new(name).ok()?;
        let mut v: libc::c_ulonglong = 0;
        let r = unsafe { sys::virTypedParamsGetULLong(self.params, self.n, name.as_ptr(), &mut v) };
        (r == 1).then_some(v)
    }
}

impl Drop for JobStats {
    fn drop(&mut self) {
        if !self.params.is_null() {
            unsafe { sys::virTypedParamsFree(self.params, self.n) };
        }
    }
}

/// virDomainGetJobStats, called directly: the virt crate's wrapper builds a
/// Vec from libvirt's pointer, which is NULL when no job runs. None when no
/// job runs (or ran, with COMPLETED) or libvirt cannot tell.
fn job_stats(d: &Domain, flags: u32) -> Option<JobStats> {
    let mut kind: libc::c_int = 0;
    let mut stats = JobStats {
        params: std::ptr::null_mut(),
        n: 0,
    };
    let r =
        unsafe { sys::virDomainGetJobStats(d.as_ptr(), &mut kind, &mut stats.params, &mut stats.n, flags) };
    if r < 0 || kind == sys::VIR_DOMAIN_JOB_NONE as libc::c_int {
        return None;
    }
    Some(stats)
}

fn metadata_of(d: &Domain) -> Option<String> {
    d.metadata(sys::VIR_DOMAIN_METADATA_ELEMENT as i32, Some(METADATA_NS), 0)
        .ok()
}

impl Hypervisor {
    /// Connects to `uri` (e.g. qemu:///system, test:///default).
    pub async fn open(uri: &str) -> Result<Hypervisor> {
        // libvirt's default handler prints every error on stderr; errors
        // are returned and logged where they matter.
        virt::error::clear_error_callback();
        let events_uri = uri.to_string();
        let pauses = tokio::task::spawn_blocking(move || pauses::PauseEvents::subscribe(&events_uri))
            .await
            .ok()
            .flatten();
        if pauses.is_none() {
            tracing::warn!(
                uri,
                "no lifecycle events from libvirt: guest pauses are measured by polling"
            );
        }
        let hv = Hypervisor {
            uri: uri.to_string(),
            conn: Mutex::new(None),
            pauses,
        };
        hv.connection().await?;
        Ok(hv)
    }

    /// Lifecycle events, when libvirt delivers them.
    pub fn pause_events(&self) -> Option<&pauses::PauseEvents> {
        self.pauses.as_ref()
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    async fn connection(&self) -> Result<Connect> {
        if let Some(c) = self.conn.lock().expect("libvirt connection lock").as_ref() {
            return Ok(c.clone());
        }
        let uri = self.uri.clone();
        let opened = tokio::time::timeout(
            QUICK,
            tokio::task::spawn_blocking(move || Connect::open(Some(&uri)).lv("open")),
        )
        .await
        .map_err(|_| HostError::Timeout {
            what: format!("connecting to libvirt at {}", self.uri),
            after: QUICK,
        })?
        .map_err(|e| HostError::Internal(format!("libvirt open: {e}")))??;
        let mut slot = self.conn.lock().expect("libvirt connection lock");
        Ok(slot.get_or_insert(opened).clone())
    }

    /// Runs `f` on the blocking pool with the connection, within `timeout`.
    /// A call that times out keeps its thread until libvirt answers; the
    /// caller gets DEADLINE_EXCEEDED at once.
    pub async fn call<T, F>(&self, op: &'static str, timeout: Duration, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connect) -> Result<T> + Send + 'static,
    {
        let conn = self.connection().await?;
        let task = tokio::task::spawn_blocking(move || f(&conn));
        let result = match tokio::time::timeout(timeout, task).await {
            Err(_) => Err(HostError::Timeout {
                what: format!("libvirt {op}"),
                after: timeout,
            }),
            Ok(Err(join)) => Err(HostError::Internal(format!("libvirt {op}: {join}"))),
            Ok(Ok(r)) => r,
        };
        if let Err(HostError::Libvirt(e)) = &result {
            if e.kind == LibvirtErrorKind::Unavailable {
                tracing::warn!(error = %e, "libvirt connection lost; reconnecting on the next call");
                self.conn.lock().expect("libvirt connection lock").take();
            }
        }
        result
    }

    /// Like [`Hypervisor::call`], on a connection of its own, opened for
    /// this call: libvirt delays other calls on a connection while a long
    /// one (a snapshot, a restore, a QEMU start) is in flight there, and the
    /// state polling that measures the guest's pause must not wait.
    pub async fn call_dedicated<T, F>(&self, op: &'static str, timeout: Duration, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connect) -> Result<T> + Send + 'static,
    {
        let uri = self.uri.clone();
        let task = tokio::task::spawn_blocking(move || {
            let conn = Connect::open(Some(&uri)).lv("open")?;
            f(&conn)
        });
        match tokio::time::timeout(timeout, task).await {
            Err(_) => Err(HostError::Timeout {
                what: format!("libvirt {op}"),
                after: timeout,
            }),
            Ok(Err(join)) => Err(HostError::Internal(format!("libvirt {op}: {join}"))),
            Ok(Ok(r)) => r,
        }
    }

    pub async fn facts(&self) -> Result<Facts> {
        self.call("facts", QUICK, |c| {
            Ok(Facts {
                hostname: c.hostname().lv("hostname")?,
                driver: c.driver_type().lv("driver_type")?,
                lib_version: c.lib_version().lv("lib_version")?,
                hyp_version: c.hyp_version().unwrap_or(0),
            })
        })
        .await
    }

    /// Starts a transient domain.
    pub async fn create(&self, xml: String, timeout: Duration) -> Result<()> {
        self.call_dedicated("create", timeout, move |c| {
            c.create_domain_xml(&xml, 0).lv("create").map(|_| ())
        })
        .await
    }

    /// The domain's state; None when there is no such domain.
    pub async fn state(&self, id: Uuid) -> Result<Option<DomainState>> {
        self.call("state", QUICK, move |c| {
            let d = match lookup(c, id, "state") {
                Ok(d) => d,
                Err(e) if e.is_no_domain() => return Ok(None),
                Err(e) => return Err(e),
            };
            match state_of(&d, "state") {
                Ok(s) => Ok(Some(s)),
                Err(e) if e.is_no_domain() => Ok(None),
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// Active domains whose name starts with `prefix`.
    pub async fn list(&self, prefix: String) -> Result<Vec<DomainEntry>> {
        self.call("list", QUICK, move |c| {
            let mut out = Vec::new();
            for d in c
                .list_all_domains(sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
                .lv("list_all_domains")?
            {
                let Ok(name) = d.name() else { continue };
                if !name.starts_with(&prefix) {
                    continue;
                }
                let Ok(uuid) = d.uuid() else { continue };
                // A domain that went away while listing is simply not listed.
                let Ok(state) = state_of(&d, "state") else {
                    continue;
                };
                out.push(DomainEntry {
                    uuid,
                    name,
                    state,
                    metadata: metadata_of(&d),
                });
            }
            Ok(out)
        })
        .await
    }

    /// Replaces the host agent's metadata element of a running domain.
    pub async fn set_metadata(&self, id: Uuid, element: String) -> Result<()> {
        self.call("set_metadata", QUICK, move |c| {
            lookup(c, id, "set_metadata")?
                .set_metadata(
                    sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                    Some(&element),
                    Some(METADATA_KEY),
                    Some(METADATA_NS),
                    sys::VIR_DOMAIN_AFFECT_LIVE,
                )
                .lv("set_metadata")
        })
        .await
    }

    /// The running domain's XML.
    pub async fn live_xml(&self, id: Uuid) -> Result<String> {
        self.call("xml_desc", QUICK, move |c| {
            lookup(c, id, "xml_desc")?.xml_desc(0).lv("xml_desc")
        })
        .await
    }

    /// Asks the guest to power off (ACPI).
    pub async fn shutdown(&self, id: Uuid) -> Result<()> {
        self.call("shutdown", QUICK, move |c| {
            lookup(c, id, "shutdown")?.shutdown().lv("shutdown")
        })
        .await
    }

    /// Kills the domain; a domain already gone is success.
    pub async fn destroy(&self, id: Uuid) -> Result<()> {
        let r = self
            .call_dedicated("destroy", QUICK, move |c| {
                lookup(c, id, "destroy")?.destroy().lv("destroy")
            })
            .await;
        match r {
            Err(e) if e.is_no_domain() => Ok(()),
            Err(HostError::Libvirt(e)) if e.kind == LibvirtErrorKind::OperationInvalid => Ok(()),
            other => other,
        }
    }

    /// virDomainSnapshotCreateXML; blocks for the whole snapshot.
    /// For the `snapshot_during_dump` failpoint (crash tests): a thread of
    /// its own, on a connection of its own, that exits the process as soon
    /// as libvirt's control state shows a job on the domain. Returns once that thread
    /// watches, so that a snapshot called next cannot finish unseen: a
    /// small guest's dump is over in a few hundred milliseconds.
    pub async fn exit_once_a_job_runs(&self, id: Uuid) {
        let uri = self.uri.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let watched = Connect::open(Some(&uri))
                .lv("open")
                .and_then(|conn| Ok((lookup(&conn, id, "failpoint")?, conn)));
            let (d, _conn) = match watched {
                Ok(w) => w,
                Err(e) => {
                    eprintln!("host failpoint snapshot_during_dump: cannot watch the domain: {e}");
                    let _ = tx.send(());
                    return;
                }
            };
            let _ = tx.send(());
            // The control state, not the job statistics: from another
            // connection, virDomainGetJobStats showed no job all along a
            // LIVE snapshot here, while the control state shows JOB.
            loop {
                let mut info = sys::virDomainControlInfo {
                    state: 0,
                    details: 0,
                    stateTime: 0,
                };
                // SAFETY: `d` is a live domain handle and `info` outlives the call.
                let r = unsafe { sys::virDomainGetControlInfo(d.as_ptr(), &mut info, 0) };
                if r == 0 && info.state == sys::VIR_DOMAIN_CONTROL_JOB {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            eprintln!("host failpoint snapshot_during_dump: exiting");
            std::process::exit(86);
        });
        let _ = rx.await;
    }

    pub async fn snapshot(&self, id: Uuid, xml: String, flags: u32, timeout: Duration) -> Result<()> {
        self.call_dedicated("snapshot", timeout, move |c| {
            lookup(c, id, "snapshot")?
                .create_snapshot_xml(&xml, flags)
                .lv("snapshot")
                .map(|_| ())
        })
        .await
    }

    /// virDomainSaveFlags: the guest's memory into `path` (a save image, the
    /// format of a snapshot's memory file), then the (transient) domain is
    /// gone. Blocks for the whole save; a failed save leaves it running.
    pub async fn save(&self, id: Uuid, path: String, timeout: Duration) -> Result<()> {
        self.call_dedicated("save", timeout, move |c| {
            let d = lookup(c, id, "save")?;
            let to = std::ffi::CString::new(path)
                .map_err(|_| HostError::Internal("a save path with a NUL byte".into()))?;
            // SAFETY: `d` is a live domain handle, `to` outlives the call, and
            // a null dxml means "the domain's own definition".
            let r = unsafe { sys::virDomainSaveFlags(d.as_ptr(), to.as_ptr(), std::ptr::null(), 0) };
            if r < 0 {
                return Err(last_error("save"));
            }
            Ok(())
        })
        .await
    }

    /// Waits (up to `limit`) until no job of libvirt's runs on the domain,
    /// such as a snapshot, save or restore that an earlier agent process
    /// began and libvirt went on with after it died. The domain's control
    /// state (virDomainGetControlInfo) cannot tell: it shows an async job
    /// only while the job is inside a monitor call, and says OK while the
    /// job waits for QEMU between calls (seen: a new snapshot begun then
    /// collided with the old one's disks). So this takes a modify job of
    /// its own (it writes ramsnap's metadata element back as it is), which
    /// libvirt grants only once any async job has ended, retrying while
    /// libvirt gives up waiting for the job lock. Ok at once when the
    /// domain is gone.
    pub async fn wait_for_jobs(&self, id: Uuid, limit: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            let r = self
                .call_dedicated("job barrier", QUICK + QUICK, move |c| {
                    let d = match lookup(c, id, "job barrier") {
                        Ok(d) => d,
                        Err(e) if e.is_no_domain() => return Ok(()),
                        Err(e) => return Err(e),
                    };
                    let element = metadata_of(&d);
                    d.set_metadata(
                        sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                        element.as_deref(),
                        element.as_ref().map(|_| METADATA_KEY),
                        Some(METADATA_NS),
                        sys::VIR_DOMAIN_AFFECT_LIVE,
                    )
                    .lv("job barrier")
                })
                .await;
            match r {
                Err(HostError::Libvirt(e)) if e.kind == LibvirtErrorKind::Timeout => {
                    tracing::warn!(vm = %id, error = %e, "libvirt still runs a job on the domain: waiting for it to end");
                }
                Err(HostError::Libvirt(e)) if e.kind == LibvirtErrorKind::NoDomain => return Ok(()),
                other => return other,
            }
            if started.elapsed() > limit {
                return Err(HostError::Timeout {
                    what: "waiting for libvirt's job on the domain to end".into(),
                    after: limit,
                });
            }
        }
    }

    /// Progress of the domain's running job, if one runs.
    pub async fn job_progress(&self, id: Uuid) -> Result<Option<JobProgress>> {
        self.call("job_stats", QUICK, move |c| {
            let d = lookup(c, id, "job_stats")?;
            let Some(stats) = job_stats(&d, 0) else {
                return Ok(None);
            };
            let processed = stats
                .get("data_processed")
                .or(stats.get("memory_processed"))
                .unwrap_or(0);
            let total = stats.get("data_total").or(stats.get("memory_total")).unwrap_or(0);
            Ok(Some(JobProgress { processed, total }))
        })
        .await
    }

    /// What libvirt says of the domain's last completed job (None when it
    /// has nothing).
    pub async fn completed_job(&self, id: Uuid) -> Result<Option<CompletedJob>> {
        self.call("job_stats", QUICK, move |c| {
            let d = lookup(c, id, "job_stats")?;
            Ok(
                job_stats(&d, sys::VIR_DOMAIN_JOB_STATS_COMPLETED).map(|s| CompletedJob {
                    downtime_ms: s.get("downtime"),
                    memory_bytes: s.get("memory_processed"),
                }),
            )
        })
        .await
    }

    /// Aborts the domain's running job; false when none was running.
    pub async fn abort_job(&self, id: Uuid) -> Result<bool> {
        self.call("abort_job", QUICK, move |c| {
            let d = lookup(c, id, "abort_job")?;
            let r = unsafe { sys::virDomainAbortJob(d.as_ptr()) };
            if r < 0 {
                let e = last_error("abort_job");
                return match e {
                    HostError::Libvirt(ref l) if l.kind == LibvirtErrorKind::OperationInvalid => Ok(false),
                    e => Err(e),
                };
            }
            Ok(true)
        })
        .await
    }

    /// Merges the active layer of disk `dev` into its backing volume and
    /// pivots the domain onto that volume (active block commit, shallow):
    /// undoes the disk part of an external snapshot.
    pub async fn commit_active_layer(&self, id: Uuid, dev: String, timeout: Duration) -> Result<()> {
        self.call_dedicated("block_commit", timeout + QUICK, move |c| {
            let d = lookup(c, id, "block_commit")?;
            let disk = cstring("block_commit", &dev)?;
            let flags = sys::VIR_DOMAIN_BLOCK_COMMIT_ACTIVE | sys::VIR_DOMAIN_BLOCK_COMMIT_SHALLOW;
            let r = unsafe {
                sys::virDomainBlockCommit(
                    d.as_ptr(),
                    disk.as_ptr(),
                    std::ptr::null(),
                    std::ptr::null(),
                    0,
                    flags,
                )
            };
            if r < 0 {
                return Err(last_error("block_commit"));
            }
            // Pivot once the job is ready (no job left means QEMU already
            // finished it); asked early, libvirt says not ready: ask again.
            let deadline = Instant::now() + timeout;
            let ended = poll_block_job(&d, &disk, deadline, Duration::from_millis(20), |info| {
                if info.is_some_and(|i| i.cur != i.end) {
                    return ControlFlow::Continue(());
                }
                match end_block_job(&d, &disk, true) {
                    Err(e) if pivot_not_ready(&e) => ControlFlow::Continue(()),
                    r => ControlFlow::Break(r),
                }
            });
            ended.unwrap_or_else(|| {
                let _ = end_block_job(&d, &disk, false);
                Err(HostError::Timeout {
                    what: format!("block commit of {dev}"),
                    after: timeout,
                })
            })
        })
        .await
    }

    /// Waits until no block job runs on disk `dev` (one an earlier agent
    /// process began and libvirt went on with); an active commit that is
    /// ready is pivoted, which is what that process was about to do. True
    /// when there was a job.
    pub async fn settle_block_job(&self, id: Uuid, dev: String, timeout: Duration) -> Result<bool> {
        self.call_dedicated("block_job_settle", timeout + QUICK, move |c| {
            let d = lookup(c, id, "block_job_settle")?;
            let disk = cstring("block_job_settle", &dev)?;
            let deadline = Instant::now() + timeout;
            let mut seen = false;
            let settled = poll_block_job(&d, &disk, deadline, Duration::from_millis(50), |info| {
                let Some(info) = info else {
                    return ControlFlow::Break(Ok(seen));
                };
                seen = true;
                if info.type_ == sys::VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT as i32
                    && info.end > 0
                    && info.cur == info.end
                {
                    // Not ready yet or done meanwhile: the next sample says.
                    let _ = end_block_job(&d, &disk, true);
                }
                ControlFlow::Continue(())
            });
            settled.unwrap_or_else(|| {
                Err(HostError::Timeout {
                    what: format!("the block job on {dev}"),
                    after: timeout,
                })
            })
        })
        .await
    }

    /// Merges `top`, a volume inside disk `dev`'s backing chain (not its
    /// active layer), into `base`, its backing volume (a non-active block
    /// commit; paths as the live XML names them): the volume above `top`
    /// then reads `base`, its header rewritten with a relative name. Waits
    /// until libvirt's job is gone; `progress` gets (done, total) samples.
    pub async fn commit_layer(
        &self,
        id: Uuid,
        dev: String,
        top: String,
        base: String,
        timeout: Duration,
        progress: impl Fn(u64, u64) + Send + 'static,
    ) -> Result<()> {
        self.call_dedicated("block_commit", timeout + QUICK, move |c| {
            let d = lookup(c, id, "block_commit")?;
            let disk = cstring("block_commit", &dev)?;
            let (top_c, base_c) = (cstring("block_commit", &top)?, cstring("block_commit", &base)?);
            let flags = sys::VIR_DOMAIN_BLOCK_COMMIT_RELATIVE;
            // SAFETY: `d` is a live domain handle; the strings outlive the call.
            let r = unsafe {
                sys::virDomainBlockCommit(
                    d.as_ptr(),
                    disk.as_ptr(),
                    base_c.as_ptr(),
                    top_c.as_ptr(),
                    0,
                    flags,
                )
            };
            if r < 0 {
                return Err(last_error("block_commit"));
            }
            let deadline = Instant::now() + timeout;
            let ended = poll_block_job(
                &d,
                &disk,
                deadline,
                Duration::from_millis(20),
                |info| match info {
                    None => ControlFlow::Break(Ok(())), // the job is over
                    Some(i) => {
                        progress(i.cur, i.end);
                        ControlFlow::Continue(())
                    }
                },
            );
            ended.unwrap_or_else(|| {
                let _ = end_block_job(&d, &disk, false);
                Err(HostError::Timeout {
                    what: format!("block commit of {top} into {base}"),
                    after: timeout,
                })
            })
        })
        .await
    }

    /// libvirt's domain capabilities of this host for that emulator,
    /// architecture, machine type and virtualization type.
    pub async fn domain_capabilities(
        &self,
        emulator: Option<String>,
        arch: String,
        machine: String,
        virt_type: String,
    ) -> Result<String> {
        self.call("domain_capabilities", QUICK, move |c| {
            c.domain_capabilities(
                emulator.as_deref(),
                Some(&arch),
                Some(&machine),
                Some(&virt_type),
                0,
            )
            .lv("domain_capabilities")
        })
        .await
    }

    /// The domain XML embedded in a saved memory image.
    pub async fn saved_xml(&self, path: String) -> Result<String> {
        self.call("save_image_xml_desc", QUICK, move |c| {
            c.save_image_xml_desc(&path, sys::VIR_DOMAIN_SAVE_IMAGE_XML_SECURE)
                .lv("save_image_xml_desc")
        })
        .await
    }

    /// Restores a saved memory image with a replacement domain XML. The
    /// guest runs when this returns, or with `paused` waits for
    /// [`Hypervisor::resume`].
    pub async fn restore(&self, path: String, xml: String, paused: bool, timeout: Duration) -> Result<()> {
        let flags = if paused {
            sys::VIR_DOMAIN_SAVE_PAUSED
        } else {
            sys::VIR_DOMAIN_SAVE_RUNNING
        };
        self.call_dedicated("restore", timeout, move |c| {
            c.restore_domain_flags(&path, Some(&xml), flags).lv("restore")
        })
        .await
    }

    pub async fn resume(&self, id: Uuid) -> Result<()> {
        self.call("resume", QUICK, move |c| {
            lookup(c, id, "resume")?.resume().lv("resume")
        })
        .await
    }
}

/// "9.0.0" from libvirt's packed version number.
pub fn version_string(v: u32) -> String {
    format!("{}.{}.{}", v / 1_000_000, (v / 1000) % 1000, v % 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_unpack() {
        assert_eq!(version_string(9_000_000), "9.0.0");
        assert_eq!(version_string(7_002_022), "7.2.22");
    }

    #[test]
    fn paused_by_a_job_is_not_a_user_pause() {
        assert_eq!(
            classify(sys::VIR_DOMAIN_PAUSED, sys::VIR_DOMAIN_PAUSED_SNAPSHOT),
            DomainState::Paused { by_user: false }
        );
        assert_eq!(
            classify(sys::VIR_DOMAIN_PAUSED, sys::VIR_DOMAIN_PAUSED_USER),
            DomainState::Paused { by_user: true }
        );
        assert_eq!(classify(sys::VIR_DOMAIN_RUNNING, 1), DomainState::Running);
    }
}
