//! Faults for crash tests, from `RAMSNAP_HOST_FAILPOINTS="name,..."`: the
//! agent process exits (code 86, like the coordinator's `crash`) at that
//! point, while libvirt goes on with what it was asked to do. Names:
//! - `snapshot_during_dump`: once libvirt's snapshot job is under way;
//! - `restore_during_load`: once libvirt's restore has created the domain.
//!
//! Each fires once per process. Unset in production: nothing fires.
use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

fn armed() -> &'static Mutex<HashSet<String>> {
    static POINTS: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    POINTS.get_or_init(|| {
        let spec = std::env::var("RAMSNAP_HOST_FAILPOINTS").unwrap_or_default();
        Mutex::new(
            spec.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
        )
    })
}

/// Whether `name` is armed (and disarms it).
pub fn hit(name: &str) -> bool {
    armed().lock().expect("failpoints").remove(name)
}

/// Exits the process, as a SIGKILL would end it, if `name` is armed.
pub fn crash(name: &str) {
    if hit(name) {
        eprintln!("host failpoint {name}: exiting");
        std::process::exit(86);
    }
}
