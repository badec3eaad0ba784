//! `ramsnap operation list|get|watch|cancel`: the coordinator's long
//! operations, for following one started elsewhere (or with --no-wait).
use super::render;
use super::wait::{follow, Done, Warnings};
use crate::client;
use crate::names::{Names, Ref};
use crate::output::{print_fields, print_json, print_line, Format};
use clap::Subcommand;
use indicatif::ProgressBar;
use ramsnap_proto::snapshot::v1 as pb;
use ramsnap_proto::snapshot::v1::operation_service_client::OperationServiceClient;
use serde_json::json;
use tonic::transport::Channel;
use uuid::Uuid;

/// The states `operation list --state` takes.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateArg {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl From<StateArg> for pb::OperationState {
    fn from(s: StateArg) -> Self {
        match s {
            StateArg::Running => pb::OperationState::Running,
            StateArg::Succeeded => pb::OperationState::Succeeded,
            StateArg::Failed => pb::OperationState::Failed,
            StateArg::Cancelled => pb::OperationState::Cancelled,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum OperationCommand {
    /// Lists the operations, oldest first, of every VM or of one.
    List {
        /// Only the operations on this VM (name or id).
        #[arg(long, value_name = "VM")]
        vm: Option<Ref>,
        /// Only the operations in this state.
        #[arg(long, value_enum)]
        state: Option<StateArg>,
    },
    /// Shows one operation.
    Get {
        /// The operation's id.
        #[arg(value_name = "OPERATION")]
        id: Uuid,
    },
    /// Follows an operation to its end with a progress bar; exits 1 when it
    /// failed or was cancelled.
    Watch {
        /// The operation's id.
        #[arg(value_name = "OPERATION")]
        id: Uuid,
    },
    /// Asks a running operation to stop; it unwinds what it did. One past
    /// its point of no return finishes instead.
    Cancel {
        /// The operation's id.
        #[arg(value_name = "OPERATION")]
        id: Uuid,
    },
}

pub async fn run(
    channel: Channel,
    names: &Names<'_>,
    output: Format,
    cmd: OperationCommand,
) -> anyhow::Result<()> {
    let mut client = OperationServiceClient::new(channel.clone());
    match cmd {
        OperationCommand::List { vm, state } => {
            let vm = match vm {
                Some(v) => Some(names.vm(&v).await?),
                None => None,
            };
            let vm_id = vm.map(|v| v.to_string()).unwrap_or_default();
            let state = state.map_or(0, |s| pb::OperationState::from(s) as i32);
            let operations: Vec<pb::Operation> = client::all_pages(
                |page_token| {
                    let mut c = client.clone();
                    let req = pb::ListOperationsRequest {
                        vm_id: vm_id.clone(),
                        page_size: 0,
                        page_token,
                        state,
                    };
                    async move { c.list_operations(req).await }
                },
                |r: &pb::ListOperationsResponse| &r.next_page_token,
            )
            .await?
            .into_iter()
            .flat_map(|r| r.operations)
            .collect();
            match output {
                Format::Table => render::operation_table(&operations).print(),
                Format::Json => print_json(&operations.iter().map(render::operation_json).collect()),
            }
        }
        OperationCommand::Get { id } => {
            let op = get(&mut client, id).await?;
            match output {
                Format::Table => print_fields(&render::operation_fields(&op)),
                Format::Json => print_json(&render::operation_json(&op)),
            }
        }
        OperationCommand::Watch { id } => {
            let op = get(&mut client, id).await?;
            let mut warnings = Warnings::default();
            warnings.print_new(&op.warnings, &ProgressBar::hidden());
            let operation = follow(&channel, output, &op, &mut warnings).await?;
            let done = Done {
                request_id: None,
                operation,
                warnings: warnings.all().to_vec(),
            };
            let summary = format!("operation {id} ({}) succeeded", done.operation.kind);
            done.print(output, summary, json!({}));
        }
        OperationCommand::Cancel { id } => {
            let resp = client
                .cancel_operation(pb::CancelOperationRequest {
                    operation_id: id.to_string(),
                })
                .await?
                .into_inner();
            let op = resp.operation.unwrap_or_default();
            match output {
                Format::Table => print_line(cancel_summary(resp.cancelling, &op)),
                Format::Json => print_json(&json!({
                    "cancelling": resp.cancelling,
                    "operation": render::operation_json(&op),
                })),
            }
        }
    }
    Ok(())
}

async fn get(client: &mut OperationServiceClient<Channel>, id: Uuid) -> anyhow::Result<pb::Operation> {
    Ok(client
        .get_operation(pb::GetOperationRequest {
            operation_id: id.to_string(),
        })
        .await?
        .into_inner()
        .operation
        .unwrap_or_default())
}

/// What a cancel did: unwinding, too late (the operation finishes), or
/// nothing (it had ended).
fn cancel_summary(cancelling: bool, op: &pb::Operation) -> String {
    let id = &op.operation_id;
    if cancelling {
        format!(
            "cancelling operation {id} ({}); follow it with `ramsnap operation watch {id}`",
            op.kind
        )
    } else if op.state == pb::OperationState::Running as i32 {
        format!(
            "operation {id} ({}) is past its point of no return: it finishes",
            op.kind
        )
    } else {
        format!(
            "operation {id} ({}) had already ended: {}",
            op.kind,
            render::operation_state(op.state)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_summaries() {
        let mut op = pb::Operation {
            operation_id: "op".into(),
            kind: "create_snapshot".into(),
            state: pb::OperationState::Running as i32,
            ..Default::default()
        };
        assert!(cancel_summary(true, &op).starts_with("cancelling operation op (create_snapshot)"));
        assert!(cancel_summary(false, &op).contains("past its point of no return"));
        op.state = pb::OperationState::Succeeded as i32;
        assert_eq!(
            cancel_summary(false, &op),
            "operation op (create_snapshot) had already ended: succeeded"
        );
    }
}
