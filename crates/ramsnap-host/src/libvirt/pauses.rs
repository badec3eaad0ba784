//! When a guest was paused and resumed, from libvirt's lifecycle events
//! (SUSPENDED, RESUMED), timestamped as they arrive. Polling the domain
//! state cannot do this well: a state query can wait behind the domain's
//! lock for longer than the pause it should see. The virt crate has no
//! wrapper for event callbacks, so this goes through virt::sys; events need
//! libvirt's default event loop, run here on a thread of its own.
use std::collections::HashMap;
use std::ffi::{c_void, CStr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;
use uuid::Uuid;
use virt::connect::Connect;
use virt::sys;

/// Registers libvirt's default event loop once per process and runs it.
/// Must happen before the process opens its first connection.
pub fn ensure_event_loop() -> bool {
    static RUNNING: OnceLock<bool> = OnceLock::new();
    *RUNNING.get_or_init(|| {
        if unsafe { sys::virEventRegisterDefaultImpl() } < 0 {
            return false;
        }
        std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| loop {
                if unsafe { sys::virEventRunDefaultImpl() } < 0 {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            })
            .is_ok()
    })
}

/// (when, paused) transitions per watched domain.
#[derive(Default)]
struct Log {
    watched: Mutex<HashMap<Uuid, Vec<(Instant, bool)>>>,
}

unsafe extern "C" fn on_lifecycle(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: libc::c_int,
    _detail: libc::c_int,
    opaque: *mut c_void,
) -> libc::c_int {
    let at = Instant::now();
    let paused = match event as u32 {
        sys::VIR_DOMAIN_EVENT_SUSPENDED => true,
        sys::VIR_DOMAIN_EVENT_RESUMED => false,
        _ => return 0,
    };
    let log = &*(opaque as *const Log);
    let mut buf = [0 as libc::c_char; sys::VIR_UUID_STRING_BUFLEN as usize];
    if sys::virDomainGetUUIDString(dom, buf.as_mut_ptr()) < 0 {
        return 0;
    }
    let Some(id) = CStr::from_ptr(buf.as_ptr())
        .to_str()
        .ok()
        .and_then(|s| Uuid::parse_str(s).ok())
    else {
        return 0;
    };
    if let Ok(mut watched) = log.watched.lock() {
        if let Some(v) = watched.get_mut(&id) {
            v.push((at, paused));
        }
    }
    0
}

unsafe extern "C" fn free_log(opaque: *mut c_void) {
    drop(Arc::from_raw(opaque as *const Log));
}

/// A connection subscribed to every domain's lifecycle events.
pub struct PauseEvents {
    conn: Connect,
    callback: libc::c_int,
    log: Arc<Log>,
}

impl PauseEvents {
    /// Subscribes on a connection of its own (blocking); None when libvirt
    /// cannot deliver events here.
    pub fn subscribe(uri: &str) -> Option<PauseEvents> {
        if !ensure_event_loop() {
            return None;
        }
        let conn = Connect::open(Some(uri)).ok()?;
        let log = Arc::new(Log::default());
        type Lifecycle = unsafe extern "C" fn(
            sys::virConnectPtr,
            sys::virDomainPtr,
            libc::c_int,
            libc::c_int,
            *mut c_void,
        ) -> libc::c_int;
        type Generic = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void);
        // libvirt's own idiom (VIR_DOMAIN_EVENT_CALLBACK): the generic type
        // stands for the event's real signature.
        let cb = unsafe { std::mem::transmute::<Lifecycle, Generic>(on_lifecycle) };
        let opaque = Arc::into_raw(log.clone()) as *mut c_void;
        let callback = unsafe {
            sys::virConnectDomainEventRegisterAny(
                conn.as_ptr(),
                std::ptr::null_mut(),
                sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as libc::c_int,
                Some(cb),
                opaque,
                Some(free_log),
            )
        };
        if callback < 0 {
            unsafe { free_log(opaque) };
            return None;
        }
        Some(PauseEvents { conn, callback, log })
    }

    /// Starts recording the domain's transitions.
    pub fn watch(&self, id: Uuid) {
        self.log.watched.lock().expect("pause log").insert(id, Vec::new());
    }

    /// The transitions recorded so far (recording goes on).
    pub fn seen(&self, id: Uuid) -> Vec<(Instant, bool)> {
        self.log
            .watched
            .lock()
            .expect("pause log")
            .get(&id)
            .cloned()
            .unwrap_or_default()
    }

    /// Stops recording; returns the transitions.
    pub fn take(&self, id: Uuid) -> Vec<(Instant, bool)> {
        self.log
            .watched
            .lock()
            .expect("pause log")
            .remove(&id)
            .unwrap_or_default()
    }
}

impl Drop for PauseEvents {
    fn drop(&mut self) {
        unsafe { sys::virConnectDomainEventDeregisterAny(self.conn.as_ptr(), self.callback) };
    }
}

/// Total paused time in a list of transitions; a pause still open counts
/// until `end`.
pub fn paused_total(events: &[(Instant, bool)], end: Instant) -> std::time::Duration {
    let mut total = std::time::Duration::ZERO;
    let mut since: Option<Instant> = None;
    for &(at, paused) in events {
        match (since, paused) {
            (None, true) => since = Some(at),
            (Some(s), false) => {
                total += at.saturating_duration_since(s);
                since = None;
            }
            _ => {}
        }
    }
    if let Some(s) = since {
        total += end.saturating_duration_since(s);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn paused_intervals_add_up() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let ev = [
            (ms(10), true),
            (ms(30), false),
            (ms(50), true),
            (ms(55), true),
            (ms(60), false),
        ];
        assert_eq!(paused_total(&ev, ms(100)), Duration::from_millis(30));
        assert_eq!(
            paused_total(&[(ms(90), true)], ms(100)),
            Duration::from_millis(10)
        );
        assert_eq!(paused_total(&[], ms(100)), Duration::ZERO);
    }
}
