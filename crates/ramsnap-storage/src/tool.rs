//! Running the external tools storage relies on (LVM, losetup, qemu-img),
//! with their stderr kept for the error.
use crate::error::{Result, StorageError};
use std::process::{Command, Stdio};

/// Runs `cmd` to completion and returns its stdout; a non-zero exit becomes
/// [`StorageError::Tool`] carrying the command line and stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let line = describe(cmd);
    let started = std::time::Instant::now();
    let out = cmd
        .stdin(Stdio::null())
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .output()
        .map_err(|e| StorageError::Tool {
            cmd: line.clone(),
            stderr: e.to_string(),
        })?;
    // After the fact, with its time: a slow path shows which commands it ran.
    tracing::debug!(cmd = %line, ms = started.elapsed().as_millis() as u64, ok = out.status.success(), "ran");
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stderr = stderr
            .lines()
            .filter(|l| !l.contains("WARNING: Activation disabled"))
            .collect::<Vec<_>>();
        return Err(StorageError::Tool {
            cmd: line,
            stderr: stderr.join("; ").trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}
