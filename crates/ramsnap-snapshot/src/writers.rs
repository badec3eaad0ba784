//! One metadata writer per storage domain.
//!
//! Several hosts may share a storage domain: a BLOCK domain is one LVM
//! volume group on a LUN that every host sees, a FILE domain one NFS
//! export. LVM's locking is local to each host, so two hosts running
//! `lvcreate` or `lvremove` on the same VG at once overwrite each other's
//! metadata: a volume one of them made is lost, or its extents are handed
//! out twice. VDSM avoids this with its SPM, one host per data center that
//! makes every metadata change; ramsnap does the same per domain, chosen
//! by the coordinator rather than by a lease on the storage:
//!
//! - **The role** lives in the coordinator's database (`domain_writers`:
//!   domain, host, generation). The first host through which the
//!   coordinator changes a domain becomes its writer. Every metadata
//!   change (CreateVolume, CreateMemoryVolumes, DeleteVolume, MergeVolume,
//!   CopyVolume's target, Put/DeleteVmDescriptor) goes to the writer's
//!   storage agent, whatever host the VM is on; reads, prepares and
//!   teardowns stay on the VM's host. Every replica reads the role from
//!   the database on each call, so all of them route to the same writer.
//! - **Fencing**: the call carries the generation (metadata
//!   `ramsnap-domain-writer`). The agent records the highest it has seen
//!   on the domain itself (a VG tag `RS_WRITER_<n>`, or `dom_md/writer`),
//!   read from the shared storage on every call, and refuses a lower one
//!   with FAILED_PRECONDITION `STALE_WRITER` (its ErrorInfo carries the
//!   recorded generation). A writer that was replaced cannot start a
//!   change once the new one has made one. A refusal of a call made under
//!   the generation the database still holds means the higher one was set
//!   outside the coordinator (a direct call, a restored database): the
//!   caller raises the database's past it and asks again.
//! - **Moving the role**: when the writer's agent refuses connections (its
//!   process is not there, so nothing of it is in flight) or does not know
//!   the domain, the caller moves the role to the VM's host, one
//!   generation up (compare-and-set on the generation: of two callers that
//!   find it gone, one moves it). A writer that is slow or unreachable in
//!   other ways (timeouts, a partition) keeps the role: its calls may still
//!   be running, and metadata integrity comes before progress; the sagas
//!   ask again until it answers.
//! - **The other hosts' view**: neither backend caches metadata. LVM reads
//!   the VG's metadata from the LUN in each command (LVM 2.03 has no
//!   lvmetad) and FILE reads the `.meta` files, so a host that prepares or
//!   reads a volume another host made sees it as the writer left it.
//!
//! What it does not cover: a caller that talks to a storage agent directly
//! (an operator's `ramsnap storage` command) is not routed; its calls carry
//! no generation and are not checked.
use crate::app::{db_status, AgentChannel, App};
use crate::db;
use ramsnap_common::{fence, ids};
use ramsnap_proto::storage::v1::storage_service_client::StorageServiceClient;
use std::future::Future;
use tonic::{Code, Status};
use uuid::Uuid;

/// A domain's metadata writer, as chosen for one call.
pub struct DomainWriter {
    pub domain: Uuid,
    pub host: db::Host,
    pub generation: i64,
    /// Its storage agent, each call stamped with `generation`.
    pub client: StorageServiceClient<AgentChannel>,
}

impl App {
    /// The metadata writer of `domain`; `via` (the host the caller works
    /// through) becomes it when the domain has none.
    pub async fn domain_writer(&self, domain: &str, via: &db::Host) -> Result<DomainWriter, Status> {
        let domain = ids::parse("domain_id", domain)?;
        let (host_id, generation) = self.db.domain_writer(domain, via.id).await.map_err(db_status)?;
        let host = if host_id == via.id {
            via.clone()
        } else {
            self.host(host_id).await?
        };
        let client = self.storage_client_stamped(&host, fence::Stamp::writer(generation))?;
        Ok(DomainWriter {
            domain,
            host,
            generation,
            client,
        })
    }

    /// Makes a metadata-changing storage call on `domain` through its
    /// writer (see the module's doc). When the writer is gone (refused the
    /// connection) or does not know the domain, the role moves to `via`
    /// and the call is made once more there.
    pub async fn on_domain_writer<T, F, Fut>(
        &self,
        domain: &str,
        via: &db::Host,
        call: F,
    ) -> Result<T, Status>
    where
        F: Fn(StorageServiceClient<AgentChannel>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut moved = false;
        let mut raised = false;
        loop {
            let w = self.domain_writer(domain, via).await?;
            match call(w.client.clone()).await {
                Err(s) if !raised && stale_writer(&s).is_some_and(|r| r < i64::MAX) => {
                    // The domain records a higher generation than the one
                    // this call was made under. When the database still
                    // says this one, nobody here moved the role: the
                    // higher one was set from outside (a direct call, a
                    // database restored from a backup), and the writer
                    // goes past it. Else the role moved meanwhile: read it
                    // again.
                    let recorded = stale_writer(&s).unwrap_or(w.generation);
                    let raised_now = self
                        .db
                        .replace_domain_writer(w.domain, w.generation, w.host.id, recorded + 1)
                        .await
                        .map_err(db_status)?;
                    if raised_now {
                        tracing::warn!(
                            domain = %w.domain, from = w.generation, to = recorded + 1,
                            "the storage domain records a writer generation the coordinator did not give; going past it"
                        );
                    }
                    raised = true;
                }
                Err(s) if !moved && w.host.id != via.id && writer_gone(&s) => {
                    tracing::warn!(
                        domain = %w.domain, from = %w.host.id, to = %via.id, generation = w.generation,
                        error = %s, "the storage domain's metadata writer is gone; moving the role"
                    );
                    self.db
                        .replace_domain_writer(w.domain, w.generation, via.id, w.generation + 1)
                        .await
                        .map_err(db_status)?;
                    moved = true;
                }
                r => return r,
            }
        }
    }
}

/// The generation recorded on the domain, when the writer refused the call
/// as made under a lower one (STALE_WRITER).
fn stale_writer(s: &Status) -> Option<i64> {
    use tonic_types::StatusExt;
    let details = s.get_error_details();
    let info = details.error_info()?;
    (s.code() == Code::FailedPrecondition && info.reason == "STALE_WRITER")
        .then(|| info.metadata.get("recorded_generation")?.parse().ok())
        .flatten()
}

/// The writer cannot act for the domain, and nothing it was asked is in
/// flight: its agent refused the connection, or it does not know the
/// domain.
fn writer_gone(s: &Status) -> bool {
    let refused = s.code() == Code::Unavailable && !crate::saga::may_have_arrived(s);
    let unknown_domain = s.code() == Code::NotFound && {
        use tonic_types::StatusExt;
        s.get_error_details()
            .resource_info()
            .is_some_and(|r| r.resource_type == "storage_domain")
    };
    refused || unknown_domain
}
