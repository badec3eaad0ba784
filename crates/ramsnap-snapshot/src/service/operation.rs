//! OperationService: long operations, their progress and their cancellation.
use super::to_operation;
use crate::app::{db_status, App};
use ramsnap_common::ids;
use ramsnap_proto::snapshot::v1 as pb;
use ramsnap_proto::snapshot::v1::operation_service_server::OperationService;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
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
        let vm = ids::parse_optional("vm_id", &req.get_ref().vm_id)?;
        let ops = self.0.db.list_operations(vm).await.map_err(db_status)?;
        Ok(Response::new(pb::ListOperationsResponse {
            operations: ops.iter().map(to_operation).collect(),
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
                // Woken by a change, or every half second (progress, other processes).
                crate::app::changed(&mut events, id, Duration::from_millis(500)).await;
                let op = app.db.get_operation(id).await.map_err(db_status)?;
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
            self.0.notify_operation(id);
        }
        let op = self.0.db.get_operation(id).await.map_err(db_status)?;
        Ok(Response::new(pb::CancelOperationResponse {
            cancelling,
            operation: Some(to_operation(&op)),
        }))
    }
}
