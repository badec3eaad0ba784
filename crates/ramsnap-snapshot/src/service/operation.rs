//! OperationService: long operations, their progress and their cancellation.
use super::to_operation;
use crate::app::{db_status, App};
use crate::db;
use ramsnap_common::paging::{self, PageRequest};
use ramsnap_common::{ids, status};
use ramsnap_proto::snapshot::v1 as pb;
use ramsnap_proto::snapshot::v1::operation_service_server::OperationService;
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

pub struct OperationApi(pub Arc<App>);

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchOperationResponse, Status>> + Send>>;

#[tonic::async_trait]
impl OperationService for OperationApi {
    async fn get_operation(
        &self,
        req: Request<pb::GetOperationRequest>,
    ) -> Result<Response<pb::GetOperationResponse>, Status> {
        let id = ids::parse("operation_id", &req.get_ref().operation_id)?;
        let op = self.0.db.get_operation(id).await.map_err(db_status)?;
        Ok(Response::new(pb::GetOperationResponse {
            operation: Some(to_operation(&op)),
        }))
    }

    async fn list_operations(
        &self,
        req: Request<pb::ListOperationsRequest>,
    ) -> Result<Response<pb::ListOperationsResponse>, Status> {
        let req = req.into_inner();
        let vm = ids::parse_optional("vm_id", &req.vm_id)?;
        let state = match pb::OperationState::try_from(req.state) {
            Ok(pb::OperationState::Unspecified) => None,
            Ok(pb::OperationState::Running) => Some(db::OperationState::Running),
            Ok(pb::OperationState::Succeeded) => Some(db::OperationState::Succeeded),
            Ok(pb::OperationState::Failed) => Some(db::OperationState::Failed),
            Ok(pb::OperationState::Cancelled) => Some(db::OperationState::Cancelled),
            Err(_) => {
                return Err(status::invalid_argument(
                    "state",
                    format!("{} is not an OperationState", req.state),
                ))
            }
        };
        let page = PageRequest::parse(
            req.page_size,
            &req.page_token,
            &[&req.vm_id, &req.state.to_string()],
        )?;
        let after = page.after.as_deref().map(paging::parse_time_key).transpose()?;
        let ops = self
            .0
            .db
            .list_operations_page(vm, state, after, page.fetch_limit())
            .await
            .map_err(db_status)?;
        let keyed = ops
            .into_iter()
            .map(|op| (paging::time_key(op.created_at, &op.id.to_string()), op))
            .collect();
        let (ops, next_page_token) = page.cut(keyed);
        Ok(Response::new(pb::ListOperationsResponse {
            operations: ops.iter().map(to_operation).collect(),
            next_page_token,
        }))
    }

    type WatchOperationStream = WatchStream;

    async fn watch_operation(
        &self,
        req: Request<pb::WatchOperationRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let id = ids::parse("operation_id", &req.get_ref().operation_id)?;
        let app = self.0.clone();
        let first = app.db.get_operation(id).await.map_err(db_status)?;
        let mut events = app.operation_events.subscribe();
        let stream = async_stream::try_stream! {
            let mut last = first.clone();
            yield pb::WatchOperationResponse { operation: Some(to_operation(&first)) };
            while !last.state.is_terminal() {
                // Woken by a change, or by the backstop (progress, other processes).
                // What the change pushed, or else a read.
                let op = match crate::app::operation_changed(&mut events, id, app.watch_backstop).await {
                    Some(op) => (*op).clone(),
                    None => app.db.get_operation(id).await.map_err(db_status)?,
                };
                if op != last {
                    yield pb::WatchOperationResponse { operation: Some(to_operation(&op)) };
                    last = op;
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cancel_operation(
        &self,
        req: Request<pb::CancelOperationRequest>,
    ) -> Result<Response<pb::CancelOperationResponse>, Status> {
        let id = ids::parse("operation_id", &req.get_ref().operation_id)?;
        let op = self.0.db.get_operation(id).await.map_err(db_status)?;
        let cancelling = !op.state.is_terminal() && self.0.db.request_cancel(id).await.map_err(db_status)?;
        if cancelling && !self.0.executor().cancel(id) {
            // Running on another replica (or none yet): it hears of it.
            self.0.notify_operation(id, None);
        }
        let op = self.0.db.get_operation(id).await.map_err(db_status)?;
        Ok(Response::new(pb::CancelOperationResponse {
            cancelling,
            operation: Some(to_operation(&op)),
        }))
    }
}
