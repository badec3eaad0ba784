//! Which volumes are in use on this host, so that nothing destroys one
//! under a reader or a writer (a guest's QEMU, a memory dump, a copy).
//!
//! A volume is *held* while it is prepared (`PrepareVolume` until
//! `TeardownVolume`) or while a copy of this process reads or writes it.
//! A held volume's whole backing chain is in use through it, so
//! [`crate::storage`] refuses to delete or merge any volume in a holder's
//! chain (`FAILED_PRECONDITION` `VOLUME_IN_USE`, naming the holder), and a
//! teardown only releases the ancestors no other holder still needs.
//!
//! Prepared holds must outlive a restart of the service (a guest keeps
//! running through it), so they are recorded in a file,
//! `<run-dir>/prepared.json`, rewritten atomically on every change. Why a
//! record rather than rediscovering prepared volumes from what is active:
//! - a FILE volume's prepare leaves no trace at all (its path is the file);
//! - on BLOCK, an active device (a loop device or an activated LV) does not
//!   say whether a client holds it or a copy that died with the process
//!   left it, and activation differs between hosts with and without
//!   device-mapper.
//!
//! The record lives in the run dir, whose lifetime is the boot's (a tmpfs
//! in production, like `/run`): a holder (QEMU, a loop device) cannot
//! survive a reboot, and neither should its hold. The file also carries the
//! kernel's boot id, so a run dir on persistent storage does not carry
//! holds over a reboot either. On BLOCK, [`crate::storage`] still treats a
//! volume whose device is active as in use even with no record (made by an
//! older version, or a record lost by hand): the check fails closed.
//!
//! Copies' holds are kept in memory only: a copy dies with its process.
use crate::error::{Result, StorageError};
use crate::model::{now_unix, VolumeRef};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use uuid::Uuid;

const RECORD: &str = "prepared.json";
const RECORD_VERSION: u32 = 1;
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// The volumes held on this host.
pub struct Holds {
    file: PathBuf,
    boot_id: String,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Prepared volumes, with when (Unix seconds). Mirrors the record.
    prepared: BTreeMap<VolumeRef, i64>,
    /// Running operations' holds: (token, volume, what holds it).
    running: Vec<(u64, VolumeRef, String)>,
    next_token: u64,
}

#[derive(Serialize, Deserialize)]
struct Record {
    version: u32,
    boot_id: String,
    prepared: Vec<Entry>,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    #[serde(flatten)]
    volume: VolumeRef,
    /// Unix seconds.
    since: i64,
}

/// What holds a volume, as [`Holds::holders`] lists them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// The held volume (in the image asked about).
    pub volume: Uuid,
    /// Who holds it, as a predicate for messages ("volume X {what}"): "is
    /// prepared on this host (PrepareVolume) ...", "is being read by a
    /// running copy (CopyVolume) ...".
    pub what: String,
}

impl Holds {
    /// Loads the record in `run_dir`. A record from another boot is
    /// dropped: nothing it names can still be open.
    pub fn open(run_dir: &Path) -> Result<Holds> {
        let file = run_dir.join(RECORD);
        let boot_id = std::fs::read_to_string(BOOT_ID)
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let mut state = State::default();
        match std::fs::read(&file) {
            Ok(bytes) => {
                let record: Record =
                    serde_json::from_slice(&bytes).map_err(|e| StorageError::CorruptMetadata {
                        subject: file.display().to_string(),
                        reason: format!(
                            "the record of prepared volumes is unreadable ({e}); remove it only if \
                             no guest on this host uses a ramsnap volume"
                        ),
                    })?;
                if record.version > RECORD_VERSION {
                    return Err(StorageError::CorruptMetadata {
                        subject: file.display().to_string(),
                        reason: format!(
                            "record version {} is newer than this service knows",
                            record.version
                        ),
                    });
                }
                if record.boot_id == boot_id {
                    state.prepared = record.prepared.into_iter().map(|e| (e.volume, e.since)).collect();
                } else {
                    tracing::info!(
                        held = record.prepared.len(),
                        "the record of prepared volumes is from an earlier boot; nothing it names is in use now"
                    );
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        let holds = Holds {
            file,
            boot_id,
            state: Mutex::new(state),
        };
        Ok(holds)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("holds lock poisoned")
    }

    fn save(&self, state: &State) -> Result<()> {
        let record = Record {
            version: RECORD_VERSION,
            boot_id: self.boot_id.clone(),
            prepared: state
                .prepared
                .iter()
                .map(|(v, since)| Entry {
                    volume: *v,
                    since: *since,
                })
                .collect(),
        };
        if let Some(dir) = self.file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        crate::file::write_atomic(
            &self.file,
            &serde_json::to_vec_pretty(&record).expect("serializable"),
        )
    }

    /// Records that `r` is prepared. Durable when this returns Ok.
    pub fn add_prepared(&self, r: VolumeRef) -> Result<()> {
        let mut state = self.lock();
        if state.prepared.contains_key(&r) {
            return Ok(());
        }
        state.prepared.insert(r, now_unix());
        if let Err(e) = self.save(&state) {
            state.prepared.remove(&r);
            return Err(e);
        }
        Ok(())
    }

    /// Forgets that `r` is prepared. Durable when this returns Ok.
    pub fn remove_prepared(&self, r: VolumeRef) -> Result<()> {
        let mut state = self.lock();
        let Some(since) = state.prepared.remove(&r) else {
            return Ok(());
        };
        if let Err(e) = self.save(&state) {
            state.prepared.insert(r, since);
            return Err(e);
        }
        Ok(())
    }

    pub fn is_prepared(&self, r: VolumeRef) -> bool {
        self.lock().prepared.contains_key(&r)
    }

    /// Holds `r` for a running operation until the guard is dropped.
    pub fn hold(self: &Arc<Self>, r: VolumeRef, what: impl Into<String>) -> RunningHold {
        let mut state = self.lock();
        let token = state.next_token;
        state.next_token += 1;
        state.running.push((token, r, what.into()));
        RunningHold {
            holds: self.clone(),
            token,
        }
    }

    /// Every hold on a volume of `image` on `domain`: prepared ones first.
    pub fn holders(&self, domain: Uuid, image: Uuid) -> Vec<Holder> {
        let state = self.lock();
        let in_image = |r: &VolumeRef| r.domain == domain && r.image == image;
        let prepared = state.prepared.keys().filter(|r| in_image(r)).map(|r| Holder {
            volume: r.volume,
            what: "is prepared on this host (PrepareVolume) and not torn down (TeardownVolume releases it)"
                .into(),
        });
        let running = state
            .running
            .iter()
            .filter(|(_, r, _)| in_image(r))
            .map(|(_, r, what)| Holder {
                volume: r.volume,
                what: what.clone(),
            });
        prepared.chain(running).collect()
    }
}

/// A running operation's hold on a volume; released on drop.
pub struct RunningHold {
    holds: Arc<Holds>,
    token: u64,
}

impl Drop for RunningHold {
    fn drop(&mut self) {
        self.holds.lock().running.retain(|(t, _, _)| *t != self.token);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r() -> VolumeRef {
        VolumeRef {
            domain: Uuid::new_v4(),
            image: Uuid::new_v4(),
            volume: Uuid::new_v4(),
        }
    }

    #[test]
    fn prepared_holds_survive_a_reopen_of_the_same_boot_only() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (r(), r());
        {
            let holds = Holds::open(dir.path()).unwrap();
            holds.add_prepared(a).unwrap();
            holds.add_prepared(b).unwrap();
            holds.remove_prepared(b).unwrap();
        }
        let holds = Arc::new(Holds::open(dir.path()).unwrap());
        assert!(holds.is_prepared(a));
        assert!(!holds.is_prepared(b));
        assert_eq!(holds.holders(a.domain, a.image).len(), 1);
        {
            let _copy = holds.hold(b, "a copy");
            assert_eq!(holds.holders(b.domain, b.image)[0].what, "a copy");
        }
        assert!(holds.holders(b.domain, b.image).is_empty(), "released on drop");

        // The same record seen after a reboot holds nothing.
        let path = dir.path().join(RECORD);
        let mut record: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        record["boot_id"] = "another-boot".into();
        std::fs::write(&path, serde_json::to_vec(&record).unwrap()).unwrap();
        assert!(!Holds::open(dir.path()).unwrap().is_prepared(a));
    }
}
