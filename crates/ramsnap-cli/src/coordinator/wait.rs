//! Long operations. A command that starts one (snapshot create, VM run, ...)
//! waits for it by default: it follows OperationService.WatchOperation with
//! a progress bar (bytes when the operation counts them, else a spinner with
//! its state), then prints the result, or fails (exit 1) with the
//! operation's error. `--no-wait` prints the operation and returns at once.
//! Ctrl-C stops waiting, not the operation (exit 130).
use super::render;
use crate::args::RequestArg;
use crate::error::with_hint;
use crate::output::{print_fields, print_json, print_line, printable, Format};
use anyhow::bail;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use ramsnap_proto::snapshot::v1 as pb;
use ramsnap_proto::snapshot::v1::operation_service_client::OperationServiceClient;
use serde_json::{json, Value};
use std::fmt;
use std::time::Duration;
use tonic::transport::Channel;
use uuid::Uuid;

/// The flags of every command that starts an operation.
#[derive(Args, Debug, Clone, Copy)]
pub struct OperationArgs {
    /// Prints the started operation and returns at once instead of waiting
    /// for it (follow it with `ramsnap operation watch`).
    #[arg(long)]
    pub no_wait: bool,
    #[command(flatten)]
    pub request: RequestArg,
}

/// An operation that did not succeed: FAILED, or CANCELLED.
#[derive(Debug)]
pub struct OperationFailed(pub pb::Operation);

impl fmt::Display for OperationFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = &self.0;
        let how = if op.state == pb::OperationState::Cancelled as i32 {
            "was cancelled"
        } else {
            "failed"
        };
        write!(f, "operation {} ({}) {how}", op.operation_id, op.kind)?;
        match render::operation_error(op) {
            e if e.is_empty() => Ok(()),
            e => write!(f, ": {e}"),
        }
    }
}

impl std::error::Error for OperationFailed {}

/// Prints each warning once, on stderr, as `warning: ...`: a response's and
/// then its operation's (which may repeat them) as they appear.
#[derive(Default, Debug)]
pub struct Warnings {
    seen: Vec<String>,
}

impl Warnings {
    pub fn print_new(&mut self, warnings: &[String], bar: &ProgressBar) {
        for w in warnings {
            if !self.seen.contains(w) {
                bar.suspend(|| eprintln!("warning: {}", printable(w)));
                self.seen.push(w.clone());
            }
        }
    }

    pub fn all(&self) -> &[String] {
        &self.seen
    }
}

/// What a command got back when it started an operation.
pub struct Started {
    pub request_id: Uuid,
    pub operation: pb::Operation,
    /// The response's own warnings (preview, clone).
    pub warnings: Vec<String>,
}

impl Started {
    pub fn new(request_id: Uuid, operation: Option<pb::Operation>, warnings: Vec<String>) -> Started {
        Started {
            request_id,
            operation: operation.unwrap_or_default(),
            warnings,
        }
    }
}

/// An operation that succeeded, with what was printed on the way.
pub struct Done {
    pub request_id: Option<Uuid>,
    pub operation: pb::Operation,
    pub warnings: Vec<String>,
}

impl Done {
    /// The operation's result: one line for people; for scripts the
    /// operation, its warnings and `extra` (an object of what it made).
    pub fn print(&self, output: Format, summary: impl fmt::Display, extra: Value) {
        match output {
            Format::Table => print_line(summary),
            Format::Json => print_json(&self.json(extra)),
        }
    }

    fn json(&self, extra: Value) -> Value {
        let mut out = json!({
            "operation": render::operation_json(&self.operation),
            "warnings": self.warnings,
        });
        if let Some(id) = self.request_id {
            out["request_id"] = Value::from(id.to_string());
        }
        if let Value::Object(fields) = extra {
            for (k, v) in fields {
                out[k] = v;
            }
        }
        out
    }
}

/// After a command started an operation: with `--no-wait`, prints it and
/// returns `None`; otherwise follows it to its end. `Err` when it failed or
/// was cancelled ([`OperationFailed`]).
pub async fn wait(
    channel: &Channel,
    output: Format,
    args: &OperationArgs,
    started: Started,
) -> anyhow::Result<Option<Done>> {
    let mut warnings = Warnings::default();
    let hidden = ProgressBar::hidden();
    warnings.print_new(&started.warnings, &hidden);
    warnings.print_new(&started.operation.warnings, &hidden);
    if args.no_wait {
        let op = &started.operation;
        match output {
            Format::Table => {
                print_fields(&render::operation_fields(op));
                eprintln!(
                    "follow it with: ramsnap operation watch {}",
                    printable(&op.operation_id)
                );
            }
            Format::Json => print_json(&json!({
                "request_id": started.request_id.to_string(),
                "operation": render::operation_json(op),
                "warnings": warnings.all(),
            })),
        }
        return Ok(None);
    }
    let operation = follow(channel, output, &started.operation, &mut warnings).await?;
    Ok(Some(Done {
        request_id: Some(started.request_id),
        operation,
        warnings: warnings.seen,
    }))
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {prefix}: {msg} ({elapsed})").expect("a valid progress template")
}

fn bytes_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}")
        .expect("a valid progress template")
        .progress_chars("=> ")
}

/// Leaves the bar where it stopped, on a line of its own.
fn abandon(bar: &ProgressBar) {
    bar.abandon();
    if !bar.is_hidden() {
        eprintln!();
    }
}

/// The bar of one operation: bytes processed of total when the operation
/// counts bytes, else a spinner showing its state.
struct Bar {
    bar: ProgressBar,
    /// Whether it shows bytes now (else a spinner); `None` before the first update.
    bytes: Option<bool>,
}

impl Bar {
    fn new(output: Format, op: &pb::Operation) -> Bar {
        // indicatif hides the bar by itself when stderr is not a terminal.
        let bar = match output {
            Format::Table => ProgressBar::new_spinner()
                .with_style(spinner_style())
                .with_prefix(printable(&op.kind.replace('_', " ")).into_owned()),
            Format::Json => ProgressBar::hidden(),
        };
        let mut bar = Bar { bar, bytes: None };
        bar.show(op);
        bar
    }

    fn show(&mut self, op: &pb::Operation) {
        let p = op.progress.unwrap_or_default();
        if p.total_bytes > 0 {
            if self.bytes != Some(true) {
                self.bar.disable_steady_tick();
                self.bar.set_style(bytes_style());
                self.bytes = Some(true);
            }
            self.bar.set_length(p.total_bytes);
            self.bar.set_position(p.processed_bytes.min(p.total_bytes));
        } else {
            if self.bytes != Some(false) {
                self.bar.set_style(spinner_style());
                self.bar.enable_steady_tick(Duration::from_millis(120));
                self.bytes = Some(false);
            }
            self.bar.set_message(render::operation_state(op.state));
        }
    }
}

fn is_terminal(op: &pb::Operation) -> bool {
    op.state != pb::OperationState::Running as i32 && op.state != pb::OperationState::Unspecified as i32
}

/// Follows an operation with WatchOperation until it ends; prints its new
/// warnings on the way. The operation as it ended when it succeeded, else
/// [`OperationFailed`]. Ctrl-C leaves it running and exits 130.
pub async fn follow(
    channel: &Channel,
    output: Format,
    started: &pb::Operation,
    warnings: &mut Warnings,
) -> anyhow::Result<pb::Operation> {
    let id = started.operation_id.clone();
    let follow_hint =
        || format!("the operation may still be running: follow it with `ramsnap operation watch {id}`");
    let mut bar = Bar::new(output, started);
    let mut last = started.clone();
    if !is_terminal(&last) {
        let mut stream = OperationServiceClient::new(channel.clone())
            .watch_operation(pb::WatchOperationRequest {
                operation_id: id.clone(),
            })
            .await
            .map_err(|s| with_hint(s, follow_hint()))?
            .into_inner();
        let interrupted = tokio::signal::ctrl_c();
        tokio::pin!(interrupted);
        loop {
            let msg = tokio::select! {
                msg = stream.message() => msg.map_err(|s| {
                    abandon(&bar.bar);
                    with_hint(s, follow_hint())
                })?,
                _ = &mut interrupted => {
                    abandon(&bar.bar);
                    // The coordinator goes on without us.
                    eprintln!(
                        "interrupted: the operation goes on in the coordinator; follow it with\n  \
                         ramsnap operation watch {id}\nor cancel it with\n  ramsnap operation cancel {id}"
                    );
                    std::process::exit(130);
                }
            };
            let Some(op) = msg.and_then(|m| m.operation) else {
                abandon(&bar.bar);
                bail!(
                    "the coordinator stopped reporting operation {id} before it ended; {}",
                    follow_hint()
                );
            };
            warnings.print_new(&op.warnings, &bar.bar);
            bar.show(&op);
            last = op;
            if is_terminal(&last) {
                break;
            }
        }
    }
    warnings.print_new(&last.warnings, &bar.bar);
    bar.bar.finish_and_clear();
    if last.state == pb::OperationState::Succeeded as i32 {
        Ok(last)
    } else {
        Err(OperationFailed(last).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(state: pb::OperationState, code: &str, message: &str) -> pb::Operation {
        pb::Operation {
            operation_id: "op".into(),
            kind: "create_snapshot".into(),
            state: state as i32,
            error_code: code.into(),
            error_message: message.into(),
            ..Default::default()
        }
    }

    #[test]
    fn failures_name_the_operation_and_its_error() {
        let failed = OperationFailed(op(pb::OperationState::Failed, "INTERNAL", "qemu-img failed"));
        assert_eq!(
            failed.to_string(),
            "operation op (create_snapshot) failed: INTERNAL: qemu-img failed"
        );
        let cancelled = OperationFailed(op(pb::OperationState::Cancelled, "CANCELLED", ""));
        assert_eq!(
            cancelled.to_string(),
            "operation op (create_snapshot) was cancelled: CANCELLED"
        );
        let bare = OperationFailed(op(pb::OperationState::Failed, "", ""));
        assert_eq!(bare.to_string(), "operation op (create_snapshot) failed");
    }

    #[test]
    fn terminal_states() {
        assert!(!is_terminal(&op(pb::OperationState::Running, "", "")));
        assert!(!is_terminal(&op(pb::OperationState::Unspecified, "", "")));
        assert!(is_terminal(&op(pb::OperationState::Succeeded, "", "")));
        assert!(is_terminal(&op(pb::OperationState::Failed, "", "")));
        assert!(is_terminal(&op(pb::OperationState::Cancelled, "", "")));
    }

    #[test]
    fn warnings_are_printed_once() {
        let mut w = Warnings::default();
        let bar = ProgressBar::hidden();
        w.print_new(&["a".into(), "b".into()], &bar);
        w.print_new(&["b".into(), "c".into()], &bar);
        assert_eq!(w.all(), ["a", "b", "c"]);
    }

    #[test]
    fn done_json_has_the_request_warnings_and_extra() {
        let id = Uuid::new_v4();
        let done = Done {
            request_id: Some(id),
            operation: op(pb::OperationState::Succeeded, "", ""),
            warnings: vec!["w".into()],
        };
        let out = done.json(json!({"snapshot": {"has_memory": true}}));
        assert_eq!(out["request_id"], id.to_string());
        assert_eq!(out["operation"]["state"], "succeeded");
        assert_eq!(out["warnings"], json!(["w"]));
        assert_eq!(out["snapshot"]["has_memory"], true);
        let watched = Done {
            request_id: None,
            ..done
        };
        assert!(watched.json(Value::Null).get("request_id").is_none());
    }

    #[test]
    fn bars_switch_between_bytes_and_spinner() {
        let mut running = op(pb::OperationState::Running, "", "");
        let mut bar = Bar::new(Format::Json, &running);
        assert_eq!(bar.bytes, Some(false));
        running.progress = Some(ramsnap_proto::common::v1::Progress {
            processed_bytes: 10,
            total_bytes: 100,
        });
        bar.show(&running);
        assert_eq!(bar.bytes, Some(true));
        assert_eq!((bar.bar.position(), bar.bar.length()), (10, Some(100)));
    }
}
