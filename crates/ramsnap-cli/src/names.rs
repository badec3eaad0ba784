//! Names where a person types an id. Every cluster, host, VM, storage
//! domain and exported VM is given by its id or by its name, a snapshot by
//! its id or its description (or a unique prefix of it). A name is looked up
//! with the List call of its kind; an id is passed on as it is (the service
//! says whether it exists). A name that matches nothing, or more than one
//! object, is an error that lists what there is, and nothing is changed.
use crate::{client, Global};
use ramsnap_proto::snapshot::v1 as pb;
use ramsnap_proto::snapshot::v1::cluster_service_client::ClusterServiceClient;
use ramsnap_proto::snapshot::v1::snapshot_service_client::SnapshotServiceClient;
use ramsnap_proto::snapshot::v1::vm_service_client::VmServiceClient;
use ramsnap_proto::storage::v1 as spb;
use ramsnap_proto::storage::v1::storage_service_client::StorageServiceClient;
use std::fmt;
use std::future::Future;
use std::str::FromStr;
use tokio::sync::OnceCell;
use tonic::transport::Channel;
use uuid::Uuid;

/// Longer than any name the services accept.
const MAX_TEXT: usize = 1024;
/// How many candidates an error lists at most.
const LISTED: usize = 10;

/// What a person typed for an object: its id, or its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ref {
    Id(Uuid),
    Name(String),
}

impl FromStr for Ref {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.is_empty() {
            return Err("empty: give a name or an id".into());
        }
        if t.len() > MAX_TEXT {
            return Err(format!("{} bytes long; names are at most {MAX_TEXT}", t.len()));
        }
        Ok(match Uuid::parse_str(t) {
            Ok(id) => Ref::Id(id),
            Err(_) => Ref::Name(t.to_string()),
        })
    }
}

impl fmt::Display for Ref {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ref::Id(id) => write!(f, "{id}"),
            Ref::Name(n) => write!(f, "{n}"),
        }
    }
}

/// The one of `candidates` (id, name) that `name` names exactly.
pub fn pick(kind: &str, name: &str, candidates: &[(Uuid, String)]) -> anyhow::Result<Uuid> {
    let hits: Vec<&(Uuid, String)> = candidates.iter().filter(|(_, n)| n == name).collect();
    match hits.as_slice() {
        [(id, _)] => Ok(*id),
        [] => Err(anyhow::anyhow!(
            "no {kind} is named {name:?}{}",
            known(kind, candidates)
        )),
        many => Err(ambiguous(kind, name, "named", many)),
    }
}

/// The snapshot whose description is `text`, or else the one whose
/// description starts with it.
pub fn pick_snapshot(text: &str, candidates: &[(Uuid, String)]) -> anyhow::Result<Uuid> {
    let exact: Vec<&(Uuid, String)> = candidates.iter().filter(|(_, d)| d == text).collect();
    match exact.as_slice() {
        [(id, _)] => return Ok(*id),
        [] => {}
        many => return Err(ambiguous("snapshot", text, "described as", many)),
    }
    let prefixed: Vec<&(Uuid, String)> = candidates.iter().filter(|(_, d)| d.starts_with(text)).collect();
    match prefixed.as_slice() {
        [(id, _)] => Ok(*id),
        [] => Err(anyhow::anyhow!(
            "no snapshot of this VM has a description that is or starts with {text:?}{}",
            known("snapshot", candidates)
        )),
        many => Err(ambiguous(
            "snapshot",
            text,
            "with a description starting with",
            many,
        )),
    }
}

fn ambiguous(kind: &str, text: &str, how: &str, hits: &[&(Uuid, String)]) -> anyhow::Error {
    let listed: Vec<String> = hits
        .iter()
        .take(LISTED)
        .map(|(id, n)| format!("  {id}  {n}"))
        .collect();
    let more = hits.len().saturating_sub(LISTED);
    anyhow::anyhow!(
        "{} {kind}s are {how} {text:?}; give one's id:\n{}{}",
        hits.len(),
        listed.join("\n"),
        if more > 0 {
            format!("\n  ... and {more} more")
        } else {
            String::new()
        }
    )
}

fn known(kind: &str, candidates: &[(Uuid, String)]) -> String {
    if candidates.is_empty() {
        return format!(" (there is no {kind})");
    }
    let mut names: Vec<&str> = candidates.iter().map(|(_, n)| n.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let more = names.len().saturating_sub(LISTED);
    let listed: Vec<String> = names.iter().take(LISTED).map(|n| format!("{n:?}")).collect();
    format!(
        " (known: {}{})",
        listed.join(", "),
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        }
    )
}

fn ids<T>(items: Vec<T>, f: impl Fn(&T) -> (&str, &str)) -> Vec<(Uuid, String)> {
    items
        .iter()
        .filter_map(|i| {
            let (id, name) = f(i);
            Some((Uuid::parse_str(id).ok()?, name.to_string()))
        })
        .collect()
}

/// `r`'s id: the one given, or the one `choose` finds among the (id, name)
/// pairs that `candidates` lists (awaited only when a name was given).
async fn resolve<F>(
    r: &Ref,
    candidates: F,
    choose: impl FnOnce(&str, &[(Uuid, String)]) -> anyhow::Result<Uuid>,
) -> anyhow::Result<Uuid>
where
    F: Future<Output = Result<Vec<(Uuid, String)>, tonic::Status>>,
{
    match r {
        Ref::Id(id) => Ok(*id),
        Ref::Name(name) => choose(name, &candidates.await?),
    }
}

/// The (id, name) pairs of every item of every page of a List call.
async fn every_page<R, T, Fut>(
    fetch: impl FnMut(String) -> Fut,
    next: impl Fn(&R) -> &str,
    items: impl Fn(R) -> Vec<T>,
    key: impl Fn(&T) -> (&str, &str),
) -> Result<Vec<(Uuid, String)>, tonic::Status>
where
    Fut: Future<Output = Result<tonic::Response<R>, tonic::Status>>,
{
    let pages = client::all_pages(fetch, next).await?;
    Ok(ids(pages.into_iter().flat_map(items).collect(), key))
}

/// Looks names up: on the coordinator's channel, and on the storage
/// service (domains) when a domain is named, connected once on first use.
pub struct Names<'a> {
    global: &'a Global,
    coordinator: Channel,
    storage: OnceCell<Channel>,
}

impl<'a> Names<'a> {
    pub fn new(global: &'a Global, coordinator: Channel) -> Names<'a> {
        Names {
            global,
            coordinator,
            storage: OnceCell::new(),
        }
    }

    pub async fn cluster(&self, r: &Ref) -> anyhow::Result<Uuid> {
        let mut client = ClusterServiceClient::new(self.coordinator.clone());
        let all = async move {
            let all = client.list_clusters(pb::ListClustersRequest {}).await?;
            Ok(ids(all.into_inner().clusters, |c| (&c.cluster_id, &c.name)))
        };
        resolve(r, all, |name, all| pick("cluster", name, all)).await
    }

    pub async fn host(&self, r: &Ref) -> anyhow::Result<Uuid> {
        let mut client = ClusterServiceClient::new(self.coordinator.clone());
        let all = async move {
            let all = client.list_hosts(pb::ListHostsRequest::default()).await?;
            Ok(ids(all.into_inner().hosts, |h| (&h.host_id, &h.name)))
        };
        resolve(r, all, |name, all| pick("host", name, all)).await
    }

    pub async fn vm(&self, r: &Ref) -> anyhow::Result<Uuid> {
        let client = VmServiceClient::new(self.coordinator.clone());
        let all = every_page(
            |page_token| {
                let mut c = client.clone();
                async move {
                    c.list_vms(pb::ListVmsRequest {
                        page_token,
                        ..Default::default()
                    })
                    .await
                }
            },
            |r: &pb::ListVmsResponse| &r.next_page_token,
            |r| r.vms,
            |v| (&v.vm_id, &v.name),
        );
        resolve(r, all, |name, all| pick("VM", name, all)).await
    }

    /// A VM held by an export domain (as `vm exported` lists them).
    pub async fn exported_vm(&self, domain: Uuid, r: &Ref) -> anyhow::Result<Uuid> {
        let client = VmServiceClient::new(self.coordinator.clone());
        let all = every_page(
            |page_token| {
                let mut c = client.clone();
                async move {
                    c.list_exported_vms(pb::ListExportedVmsRequest {
                        export_domain_id: domain.to_string(),
                        page_size: 0,
                        page_token,
                    })
                    .await
                }
            },
            |r: &pb::ListExportedVmsResponse| &r.next_page_token,
            |r| r.vms,
            |v| (&v.vm_id, &v.name),
        );
        resolve(r, all, |name, all| pick("exported VM", name, all)).await
    }

    /// A snapshot of `vm`: by id, description, or a unique prefix of one.
    pub async fn snapshot(&self, vm: Uuid, r: &Ref) -> anyhow::Result<Uuid> {
        let client = SnapshotServiceClient::new(self.coordinator.clone());
        let all = every_page(
            |page_token| {
                let mut c = client.clone();
                async move {
                    c.list_snapshots(pb::ListSnapshotsRequest {
                        vm_id: vm.to_string(),
                        page_size: 0,
                        page_token,
                    })
                    .await
                }
            },
            |r: &pb::ListSnapshotsResponse| &r.next_page_token,
            |r| r.snapshots,
            |s| (&s.snapshot_id, &s.description),
        );
        resolve(r, all, pick_snapshot).await
    }

    /// A storage domain, looked up on the storage service (`--storage`).
    pub async fn domain(&self, r: &Ref) -> anyhow::Result<Uuid> {
        if let Ref::Id(id) = r {
            return Ok(*id);
        }
        let channel = self
            .storage
            .get_or_try_init(|| {
                client::connect(
                    &self.global.storage,
                    "storage",
                    "--storage or RAMSNAP_STORAGE",
                    &self.global.security,
                )
            })
            .await?;
        domain_on(&mut StorageServiceClient::new(channel.clone()), r).await
    }
}

/// A storage domain, looked up on the storage service `client` talks to.
pub async fn domain_on(client: &mut StorageServiceClient<Channel>, r: &Ref) -> anyhow::Result<Uuid> {
    let all = async move {
        let all = client.list_domains(spb::ListDomainsRequest {}).await?;
        Ok(ids(all.into_inner().domains, |d| (&d.domain_id, &d.name)))
    };
    resolve(r, all, |name, all| pick("storage domain", name, all)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two() -> (Uuid, Uuid, Vec<(Uuid, String)>) {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        (a, b, vec![(a, "web".into()), (b, "db".into())])
    }

    #[test]
    fn text_is_an_id_when_it_parses_as_one() {
        let id = Uuid::new_v4();
        assert_eq!(id.to_string().parse::<Ref>().unwrap(), Ref::Id(id));
        assert_eq!(" web ".parse::<Ref>().unwrap(), Ref::Name("web".into()));
        assert!("".parse::<Ref>().is_err());
        assert!("   ".parse::<Ref>().is_err());
        assert!("x".repeat(MAX_TEXT + 1).parse::<Ref>().is_err());
    }

    #[test]
    fn a_name_picks_the_one_object_named_so() {
        let (a, b, all) = two();
        assert_eq!(pick("VM", "web", &all).unwrap(), a);
        assert_eq!(pick("VM", "db", &all).unwrap(), b);
        // Exact: neither a prefix nor another case.
        let e = pick("VM", "we", &all).unwrap_err().to_string();
        assert!(
            e.contains("no VM is named \"we\"") && e.contains("\"db\", \"web\""),
            "{e}"
        );
        assert!(pick("VM", "WEB", &all).is_err());
        let e = pick("cluster", "x", &[]).unwrap_err().to_string();
        assert!(e.contains("there is no cluster"), "{e}");
    }

    #[test]
    fn an_ambiguous_name_lists_the_matches_with_their_ids() {
        let (a, _, mut all) = two();
        let c = Uuid::new_v4();
        all.push((c, "web".into()));
        let e = pick("VM", "web", &all).unwrap_err().to_string();
        assert!(e.starts_with("2 VMs are named \"web\""), "{e}");
        assert!(e.contains(&a.to_string()) && e.contains(&c.to_string()), "{e}");
        let many: Vec<(Uuid, String)> = (0..25).map(|_| (Uuid::new_v4(), "same".into())).collect();
        let e = pick("VM", "same", &many).unwrap_err().to_string();
        assert!(e.contains("and 15 more"), "{e}");
    }

    #[test]
    fn a_snapshot_is_picked_by_description_or_a_unique_prefix() {
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let all = vec![
            (a, "before upgrade".to_string()),
            (b, "before upgrade 2".to_string()),
            (c, "Active VM".to_string()),
        ];
        // The exact description wins over the prefix it also is.
        assert_eq!(pick_snapshot("before upgrade", &all).unwrap(), a);
        assert_eq!(pick_snapshot("before upgrade 2", &all).unwrap(), b);
        assert_eq!(pick_snapshot("Act", &all).unwrap(), c);
        let e = pick_snapshot("before", &all).unwrap_err().to_string();
        assert!(
            e.starts_with("2 snapshots are with a description starting with"),
            "{e}"
        );
        let e = pick_snapshot("after", &all).unwrap_err().to_string();
        assert!(e.contains("no snapshot of this VM"), "{e}");
    }
}
