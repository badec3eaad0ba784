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
//! running through it), so they are recorded: `<run-dir>/prepared.json`,
//! the whole record, rewritten atomically when the service opens it and
//! when the journal grows long; and `<run-dir>/prepared.journal`, where each
//! change is appended (one line, synced) before it is answered. Rewriting
//! the whole record on every change cost a new file per change and grew
//! with the number of prepared volumes (12% of the storage agent's CPU with
//! 64 VMs taking snapshots at once). Why a record rather than rediscovering
//! prepared volumes from what is active:
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
const JOURNAL: &str = "prepared.journal";
/// The journal is folded into the record when it has this many changes
/// more than twice the number of prepared volumes.
const JOURNAL_SLACK: usize = 256;
const RECORD_VERSION: u32 = 1;
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// The volumes held on this host.
pub struct Holds {
    file: PathBuf,
    journal_path: PathBuf,
    boot_id: String,
    state: Mutex<State>,
}

struct State {
    /// Prepared volumes, with when (Unix seconds). Mirrors the record and
    /// its journal.
    prepared: BTreeMap<VolumeRef, i64>,
    /// Running operations' holds: (token, volume, what holds it).
    running: Vec<(u64, VolumeRef, String)>,
    next_token: u64,
    /// The journal, open for appending, and how many changes it holds.
    journal: std::fs::File,
    journal_changes: usize,
}

/// The journal's first line: the boot it belongs to.
#[derive(Serialize, Deserialize)]
struct JournalHeader {
    boot_id: String,
}

/// A change, one line of the journal.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Change {
    Add(Entry),
    Remove(VolumeRef),
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
        let mut prepared = BTreeMap::new();
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
                    prepared = record.prepared.into_iter().map(|e| (e.volume, e.since)).collect();
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
        let journal_path = run_dir.join(JOURNAL);
        std::fs::create_dir_all(run_dir)?;
        replay_journal(&journal_path, &boot_id, &mut prepared)?;
        // Fold the journal into the record, and start a new journal.
        let journal = write_record(&file, &journal_path, &boot_id, &prepared)?;
        Ok(Holds {
            file,
            journal_path,
            boot_id,
            state: Mutex::new(State {
                prepared,
                running: Vec::new(),
                next_token: 0,
                journal,
                journal_changes: 0,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("holds lock poisoned")
    }

    /// Appends `change` to the journal (synced), folding the journal into
    /// the record when it has grown long.
    fn record(&self, state: &mut State, change: &Change) -> Result<()> {
        use std::io::Write;
        let mut line = serde_json::to_vec(change).expect("serializable");
        line.push(b'\n');
        state.journal.write_all(&line)?;
        state.journal.sync_data()?;
        state.journal_changes += 1;
        if state.journal_changes > 2 * state.prepared.len() + JOURNAL_SLACK {
            let journal = write_record(&self.file, &self.journal_path, &self.boot_id, &state.prepared)?;
            state.journal = journal;
            state.journal_changes = 0;
        }
        Ok(())
    }

    /// Records that `r` is prepared. Durable when this returns Ok.
    pub fn add_prepared(&self, r: VolumeRef) -> Result<()> {
        let mut state = self.lock();
        if state.prepared.contains_key(&r) {
            return Ok(());
        }
        let since = now_unix();
        state.prepared.insert(r, since);
        if let Err(e) = self.record(&mut state, &Change::Add(Entry { volume: r, since })) {
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
        if let Err(e) = self.record(&mut state, &Change::Remove(r)) {
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

/// Applies the journal at `path` to `prepared`, if it belongs to this boot.
/// A last line cut short (a crash while it was appended) is ignored: that
/// change was never answered.
fn replay_journal(path: &Path, boot_id: &str, prepared: &mut BTreeMap<VolumeRef, i64>) -> Result<()> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let corrupt = |reason: String| StorageError::CorruptMetadata {
        subject: path.display().to_string(),
        reason: format!(
            "{reason}; remove it and {RECORD} only if no guest on this host uses a ramsnap volume"
        ),
    };
    let mut lines = bytes.split(|b| *b == b'\n').peekable();
    let header = lines.next().unwrap_or_default();
    match serde_json::from_slice::<JournalHeader>(header) {
        Ok(h) if h.boot_id == boot_id => {}
        // Another boot's, or cut short before its header was whole.
        _ => return Ok(()),
    }
    while let Some(line) = lines.next() {
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice::<Change>(line) {
            Ok(Change::Add(e)) => {
                prepared.insert(e.volume, e.since);
            }
            Ok(Change::Remove(r)) => {
                prepared.remove(&r);
            }
            // The last line, without its newline: cut short.
            Err(_) if lines.peek().is_none() => break,
            Err(e) => return Err(corrupt(format!("a change in the journal is unreadable ({e})"))),
        }
    }
    Ok(())
}

/// Writes the whole record atomically, then starts a new, empty journal
/// (its header synced); returns the journal open for appending. A crash
/// between the two leaves the old journal beside the new record: replayed
/// over it, it changes nothing (each change sets or clears one volume, and
/// the record already holds the last of each).
fn write_record(
    file: &Path,
    journal_path: &Path,
    boot_id: &str,
    prepared: &BTreeMap<VolumeRef, i64>,
) -> Result<std::fs::File> {
    use std::io::Write;
    let record = Record {
        version: RECORD_VERSION,
        boot_id: boot_id.to_string(),
        prepared: prepared
            .iter()
            .map(|(v, since)| Entry {
                volume: *v,
                since: *since,
            })
            .collect(),
    };
    crate::file::write_atomic(file, &serde_json::to_vec_pretty(&record).expect("serializable"))?;
    let mut journal = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(journal_path)?;
    let mut header = serde_json::to_vec(&JournalHeader {
        boot_id: boot_id.to_string(),
    })
    .expect("serializable");
    header.push(b'\n');
    journal.write_all(&header)?;
    journal.sync_all()?;
    if let Some(dir) = journal_path.parent() {
        crate::file::sync_dir(dir)?;
    }
    Ok(journal)
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

    /// Changes since the record was written are in the journal only; a
    /// reopen replays them. A change cut short by a crash (the journal's
    /// last line, incomplete) was never answered and is ignored.
    #[test]
    fn the_journal_is_replayed_and_a_torn_last_change_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (r(), r(), r());
        {
            let holds = Holds::open(dir.path()).unwrap();
            holds.add_prepared(a).unwrap();
            holds.add_prepared(b).unwrap();
            holds.add_prepared(c).unwrap();
            holds.remove_prepared(b).unwrap();
        }
        // The record was written at open: the four changes are journal only.
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(RECORD)).unwrap()).unwrap();
        assert_eq!(record["prepared"].as_array().unwrap().len(), 0);
        let journal = dir.path().join(JOURNAL);
        assert_eq!(std::fs::read_to_string(&journal).unwrap().lines().count(), 5);
        // A crash while appending "remove c": half a line.
        let line = serde_json::to_string(&Change::Remove(c)).unwrap();
        let mut bytes = std::fs::read(&journal).unwrap();
        bytes.extend_from_slice(&line.as_bytes()[..line.len() / 2]);
        std::fs::write(&journal, bytes).unwrap();

        let holds = Holds::open(dir.path()).unwrap();
        assert!(holds.is_prepared(a) && !holds.is_prepared(b) && holds.is_prepared(c));
        // Reopening folded the journal into the record.
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(RECORD)).unwrap()).unwrap();
        assert_eq!(record["prepared"].as_array().unwrap().len(), 2);
        assert_eq!(std::fs::read_to_string(&journal).unwrap().lines().count(), 1);

        // A damaged change that is not the last is refused, not skipped.
        drop(holds);
        let good = serde_json::to_string(&Change::Remove(a)).unwrap();
        let mut text = std::fs::read_to_string(&journal).unwrap();
        text.push_str("{\"add\": garbage}\n");
        text.push_str(&good);
        text.push('\n');
        std::fs::write(&journal, text).unwrap();
        assert!(matches!(
            Holds::open(dir.path()),
            Err(StorageError::CorruptMetadata { .. })
        ));
    }

    /// The journal is folded into the record once it is long; the state
    /// read back is the same.
    #[test]
    fn a_long_journal_is_folded_into_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let holds = Holds::open(dir.path()).unwrap();
        let kept = r();
        holds.add_prepared(kept).unwrap();
        for _ in 0..JOURNAL_SLACK {
            let v = r();
            holds.add_prepared(v).unwrap();
            holds.remove_prepared(v).unwrap();
        }
        let lines = std::fs::read_to_string(dir.path().join(JOURNAL))
            .unwrap()
            .lines()
            .count();
        assert!(lines < JOURNAL_SLACK, "{lines} lines: the journal was not folded");
        drop(holds);
        let holds = Holds::open(dir.path()).unwrap();
        assert!(holds.is_prepared(kept));
        assert_eq!(holds.lock().prepared.len(), 1);
    }

    /// A journal from another boot (a run dir on persistent storage) holds
    /// nothing, like the record.
    #[test]
    fn another_boots_journal_holds_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let a = r();
        {
            let holds = Holds::open(dir.path()).unwrap();
            holds.add_prepared(a).unwrap();
        }
        let journal = dir.path().join(JOURNAL);
        let text = std::fs::read_to_string(&journal).unwrap();
        let (_, rest) = text.split_once('\n').unwrap();
        std::fs::write(&journal, format!("{{\"boot_id\":\"another-boot\"}}\n{rest}")).unwrap();
        assert!(!Holds::open(dir.path()).unwrap().is_prepared(a));
    }
}
