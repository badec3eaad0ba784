//! Values built from files that are rebuilt when the files change on disk:
//! TLS configurations, token files, authorization policies.
//!
//! Changes are found by polling each file's identity and size (device,
//! inode, modification time, length, all after following symlinks). Polling
//! is simple and sees Kubernetes Secret updates, which swap a symlink to a
//! new directory rather than writing the files in place. A new version that
//! fails to load (a half-written file, a key that does not match its
//! certificate) is logged and the previous value stays in use; the next
//! change is tried again.
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How often files are checked for changes unless told otherwise.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// A value loaded from files, kept current by a background task that polls
/// them. Clones share the value and the task; the task stops when the last
/// clone is dropped.
pub struct Reloadable<T> {
    rx: watch::Receiver<Arc<T>>,
    _task: Option<Arc<AbortOnDrop>>,
}

impl<T> Clone for Reloadable<T> {
    fn clone(&self) -> Self {
        Reloadable {
            rx: self.rx.clone(),
            _task: self._task.clone(),
        }
    }
}

impl<T> fmt::Debug for Reloadable<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reloadable").finish_non_exhaustive()
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T: Send + Sync + 'static> Reloadable<T> {
    /// Loads the value once with `load` (an error here is returned: a
    /// service must not start on a broken configuration), then polls
    /// `files` every `interval` and reloads when any of them changed.
    /// `what` names the value in logs. Must be called within a Tokio
    /// runtime.
    pub fn spawn<F>(what: &str, files: Vec<PathBuf>, interval: Duration, load: F) -> anyhow::Result<Self>
    where
        F: Fn() -> anyhow::Result<T> + Send + Sync + 'static,
    {
        let mut seen = fingerprint(&files);
        let first = load().map_err(|e| e.context(format!("loading {what}")))?;
        let (tx, rx) = watch::channel(Arc::new(first));
        let what = what.to_string();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = tx.closed() => return,
                }
                let now = fingerprint(&files);
                if now == seen {
                    continue;
                }
                seen = now;
                match load() {
                    Ok(value) => {
                        tracing::info!(what = %what, "reloaded after a file changed");
                        tx.send_replace(Arc::new(value));
                    }
                    Err(e) => tracing::error!(
                        what = %what,
                        error = format!("{e:#}"),
                        "a changed file does not load; keeping the previous version"
                    ),
                }
            }
        });
        Ok(Reloadable {
            rx,
            _task: Some(Arc::new(AbortOnDrop(task.abort_handle()))),
        })
    }
}

impl<T> Reloadable<T> {
    /// A value that never changes (tests, or configuration given inline).
    pub fn fixed(value: T) -> Self {
        // The receiver keeps the last value after the sender is gone.
        let (_, rx) = watch::channel(Arc::new(value));
        Reloadable { rx, _task: None }
    }

    /// The current value.
    pub fn current(&self) -> Arc<T> {
        self.rx.borrow().clone()
    }

    /// A receiver that is told of every reload (tests wait on it).
    pub fn subscribe(&self) -> watch::Receiver<Arc<T>> {
        self.rx.clone()
    }
}

/// What identifies a version of a file for change detection; `None` for a
/// file that cannot be read (a change too, once it appears).
type Fingerprint = Option<(u64, u64, i64, i64, u64)>;

fn fingerprint(files: &[PathBuf]) -> Vec<Fingerprint> {
    files.iter().map(|p| file_fingerprint(p)).collect()
}

fn file_fingerprint(path: &Path) -> Fingerprint {
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.mtime(), m.mtime_nsec(), m.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reloads_on_change_and_keeps_the_old_value_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("n");
        std::fs::write(&file, "1").unwrap();
        let path = file.clone();
        let r = Reloadable::spawn(
            "number",
            vec![file.clone()],
            Duration::from_millis(20),
            move || Ok(std::fs::read_to_string(&path)?.trim().parse::<u32>()?),
        )
        .unwrap();
        assert_eq!(*r.current(), 1);
        let mut rx = r.subscribe();
        rx.borrow_and_update();

        std::fs::write(&file, "22").unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(*r.current(), 22);

        // Broken: the old value stays; then a good one is picked up.
        std::fs::write(&file, "not a number").unwrap();
        std::fs::write(dir.path().join("marker"), "").unwrap();
        let again = tokio::time::timeout(Duration::from_millis(300), rx.changed()).await;
        assert!(again.is_err(), "a broken file must not replace the value");
        assert_eq!(*r.current(), 22);
        std::fs::write(&file, "333").unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(*r.current(), 333);
    }

    #[tokio::test]
    async fn first_load_error_is_returned() {
        let err = Reloadable::<u32>::spawn("nothing", vec![], DEFAULT_POLL_INTERVAL, || {
            anyhow::bail!("broken")
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("loading nothing"));
    }
}
