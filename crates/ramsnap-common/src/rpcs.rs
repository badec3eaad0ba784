//! The one table of every RPC a ramsnap server serves: who may call it
//! ([`Access`]) and what kind of call it is ([`CallKind`], which decides its
//! time limit in [`crate::limits`]). [`crate::authz`] denies any path that
//! is not here; a unit test checks the table against the protos'
//! descriptor sets, both ways, so an RPC added to a proto without an entry
//! here fails the build's tests.
//!
//! Roles (see [`Role::satisfies`]):
//! - `viewer`: reads (Get/List/Watch/ReadConsole) on the coordinator;
//! - `operator`: VM and snapshot operations on the coordinator;
//! - `admin`: clusters, hosts, and storage domain registration; implies
//!   operator and viewer, never coordinator;
//! - `coordinator`: what the agents (StorageService, HostService) do for the
//!   coordinator, which alone drives them (it holds the VM locks and the
//!   sagas); implies host and viewer;
//! - `host`: what a host agent needs from the storage agent beside it (read
//!   a volume, prepare and tear it down); implies viewer.
//!
//! Health and reflection: any authenticated caller.
use std::collections::HashMap;
use std::fmt;
use std::sync::OnceLock;

/// A role a policy grants to identities.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Role {
    Viewer,
    Operator,
    Admin,
    Host,
    Coordinator,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Viewer,
        Role::Operator,
        Role::Admin,
        Role::Host,
        Role::Coordinator,
    ];

    /// The name in policy files and error details.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
            Role::Host => "host",
            Role::Coordinator => "coordinator",
        }
    }

    /// Whether holding `self` allows what `required` allows:
    /// admin ⊇ operator ⊇ viewer and coordinator ⊇ host ⊇ viewer.
    pub fn satisfies(self, required: Role) -> bool {
        use Role::*;
        self == required
            || matches!(
                (self, required),
                (Admin, Operator | Viewer)
                    | (Operator, Viewer)
                    | (Coordinator, Host | Viewer)
                    | (Host, Viewer)
            )
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role {s:?} (roles: viewer, operator, admin, host, coordinator)"))
    }
}

/// The roles an identity holds.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct RoleSet(u8);

impl RoleSet {
    pub const EMPTY: RoleSet = RoleSet(0);

    /// Every role (the local identity of a plain-text loopback server).
    pub fn all() -> RoleSet {
        Role::ALL.into_iter().fold(RoleSet::EMPTY, RoleSet::with)
    }

    fn bit(r: Role) -> u8 {
        1 << (r as u8)
    }

    #[must_use]
    pub fn with(self, r: Role) -> RoleSet {
        RoleSet(self.0 | RoleSet::bit(r))
    }

    pub fn contains(self, r: Role) -> bool {
        self.0 & RoleSet::bit(r) != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = Role> {
        Role::ALL.into_iter().filter(move |r| self.contains(*r))
    }

    /// Whether one of the roles satisfies `required`.
    pub fn satisfies(self, required: Role) -> bool {
        self.iter().any(|r| r.satisfies(required))
    }
}

impl fmt::Debug for RoleSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter().map(Role::as_str)).finish()
    }
}

impl fmt::Display for RoleSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.iter().map(Role::as_str).collect();
        f.write_str(&names.join(","))
    }
}

/// Who may call an RPC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Any authenticated caller (health, reflection).
    Authenticated,
    /// A caller holding a role that satisfies this one.
    Role(Role),
}

/// What kind of call an RPC is, for its time limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallKind {
    /// Answers in well under the unary timeout.
    Unary,
    /// A unary call that may rightly run for minutes (qemu-img, checksums
    /// over a whole memory dump, a graceful guest shutdown, waiting for a
    /// storage domain's lock): no server-side timeout; only trusted callers
    /// (the coordinator, a host agent) reach these, and their own deadlines
    /// bound them.
    Long,
    /// The response is a stream (server or bidirectional streaming): never
    /// timed out by the server.
    Stream,
}

/// One RPC: its path (`/package.Service/Method`), who may call it, its kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rpc {
    pub path: &'static str,
    pub access: Access,
    pub kind: CallKind,
}

impl Rpc {
    /// Mutating: anything that needs more than viewer (or no role); these
    /// calls are audited.
    pub fn is_mutating(&self) -> bool {
        !matches!(self.access, Access::Authenticated | Access::Role(Role::Viewer))
    }

    /// The role it needs, for messages (`authenticated` when none).
    pub fn required(&self) -> &'static str {
        match self.access {
            Access::Authenticated => "authenticated",
            Access::Role(r) => r.as_str(),
        }
    }
}

const fn rpc(path: &'static str, role: Role, kind: CallKind) -> Rpc {
    Rpc {
        path,
        access: Access::Role(role),
        kind,
    }
}

const fn any(path: &'static str, kind: CallKind) -> Rpc {
    Rpc {
        path,
        access: Access::Authenticated,
        kind,
    }
}

use CallKind::{Long, Stream, Unary};
use Role::{Admin, Coordinator, Host, Operator, Viewer};

/// Every RPC of every ramsnap server. Coordinator calls that change things
/// start an operation and return at once, hence `Unary`; the agents' calls
/// that act on guests or volumes are `Long`.
pub const RPCS: &[Rpc] = &[
    // Coordinator: clusters and hosts are the installation's shape: admin.
    rpc("/ramsnap.snapshot.v1.ClusterService/CreateCluster", Admin, Unary),
    rpc("/ramsnap.snapshot.v1.ClusterService/GetCluster", Viewer, Unary),
    rpc("/ramsnap.snapshot.v1.ClusterService/ListClusters", Viewer, Unary),
    rpc("/ramsnap.snapshot.v1.ClusterService/AddHost", Admin, Unary),
    rpc("/ramsnap.snapshot.v1.ClusterService/ListHosts", Viewer, Unary),
    rpc("/ramsnap.snapshot.v1.ClusterService/RemoveHost", Admin, Unary),
    rpc("/ramsnap.snapshot.v1.ClusterService/DeleteCluster", Admin, Unary),
    // Coordinator: VMs. Export and import move VMs between domains the
    // admin registered: operator, like any other VM operation.
    rpc("/ramsnap.snapshot.v1.VmService/CreateVm", Operator, Unary),
    rpc("/ramsnap.snapshot.v1.VmService/GetVm", Viewer, Unary),
    rpc("/ramsnap.snapshot.v1.VmService/ListVms", Viewer, Unary),
    rpc("/ramsnap.snapshot.v1.VmService/RemoveVm", Operator, Unary),
    rpc("/ramsnap.snapshot.v1.VmService/RunVm", Operator, Unary),
    rpc("/ramsnap.snapshot.v1.VmService/StopVm", Operator, Unary),
    rpc("/ramsnap.snapshot.v1.VmService/UpdateVm", Operator, Unary),
    rpc("/ramsnap.snapshot.v1.VmService/WatchVm", Viewer, Stream),
    rpc("/ramsnap.snapshot.v1.VmService/ReadConsole", Viewer, Unary),
    rpc("/ramsnap.snapshot.v1.VmService/SuspendVm", Operator, Unary),
    rpc("/ramsnap.snapshot.v1.VmService/ExportVm", Operator, Unary),
    rpc("/ramsnap.snapshot.v1.VmService/ListExportedVms", Viewer, Unary),
    rpc("/ramsnap.snapshot.v1.VmService/ImportVm", Operator, Unary),
    // Coordinator: snapshots.
    rpc(
        "/ramsnap.snapshot.v1.SnapshotService/CreateSnapshot",
        Operator,
        Unary,
    ),
    rpc("/ramsnap.snapshot.v1.SnapshotService/GetSnapshot", Viewer, Unary),
    rpc(
        "/ramsnap.snapshot.v1.SnapshotService/ListSnapshots",
        Viewer,
        Unary,
    ),
    rpc(
        "/ramsnap.snapshot.v1.SnapshotService/RemoveSnapshot",
        Operator,
        Unary,
    ),
    rpc(
        "/ramsnap.snapshot.v1.SnapshotService/PreviewSnapshot",
        Operator,
        Unary,
    ),
    rpc(
        "/ramsnap.snapshot.v1.SnapshotService/UndoPreview",
        Operator,
        Unary,
    ),
    rpc(
        "/ramsnap.snapshot.v1.SnapshotService/CommitSnapshot",
        Operator,
        Unary,
    ),
    rpc(
        "/ramsnap.snapshot.v1.SnapshotService/CloneVmFromSnapshot",
        Operator,
        Unary,
    ),
    // Coordinator: operations; cancelling one changes a VM: operator.
    rpc(
        "/ramsnap.snapshot.v1.OperationService/GetOperation",
        Viewer,
        Unary,
    ),
    rpc(
        "/ramsnap.snapshot.v1.OperationService/ListOperations",
        Viewer,
        Unary,
    ),
    rpc(
        "/ramsnap.snapshot.v1.OperationService/WatchOperation",
        Viewer,
        Stream,
    ),
    rpc(
        "/ramsnap.snapshot.v1.OperationService/CancelOperation",
        Operator,
        Unary,
    ),
    // Storage agent. Registering a domain is the admin's (the CLI's
    // `domain register`); every change to volumes is the coordinator's,
    // except what the host agent beside it needs to open a volume.
    rpc("/ramsnap.storage.v1.StorageService/RegisterDomain", Admin, Long),
    rpc("/ramsnap.storage.v1.StorageService/GetDomain", Viewer, Unary),
    rpc("/ramsnap.storage.v1.StorageService/ListDomains", Viewer, Unary),
    rpc(
        "/ramsnap.storage.v1.StorageService/CreateVolume",
        Coordinator,
        Long,
    ),
    rpc(
        "/ramsnap.storage.v1.StorageService/CreateMemoryVolumes",
        Coordinator,
        Long,
    ),
    rpc("/ramsnap.storage.v1.StorageService/GetVolume", Viewer, Unary),
    rpc("/ramsnap.storage.v1.StorageService/ListVolumes", Viewer, Unary),
    rpc(
        "/ramsnap.storage.v1.StorageService/DeleteVolume",
        Coordinator,
        Long,
    ),
    rpc(
        "/ramsnap.storage.v1.StorageService/MergeVolume",
        Coordinator,
        Long,
    ),
    rpc(
        "/ramsnap.storage.v1.StorageService/CopyVolume",
        Coordinator,
        Stream,
    ),
    rpc("/ramsnap.storage.v1.StorageService/PrepareVolume", Host, Long),
    rpc("/ramsnap.storage.v1.StorageService/TeardownVolume", Host, Long),
    rpc(
        "/ramsnap.storage.v1.StorageService/PutVmDescriptor",
        Coordinator,
        Long,
    ),
    rpc(
        "/ramsnap.storage.v1.StorageService/GetVmDescriptor",
        Viewer,
        Unary,
    ),
    rpc(
        "/ramsnap.storage.v1.StorageService/ListVmDescriptors",
        Viewer,
        Unary,
    ),
    rpc(
        "/ramsnap.storage.v1.StorageService/DropCommittedVolume",
        Coordinator,
        Long,
    ),
    rpc(
        "/ramsnap.storage.v1.StorageService/DeleteVmDescriptor",
        Coordinator,
        Long,
    ),
    // Host agent: only the coordinator acts on guests; reads for viewers
    // (the admin, by policy) too.
    rpc("/ramsnap.host.v1.HostService/GetHostInfo", Viewer, Unary),
    rpc("/ramsnap.host.v1.HostService/RunVm", Coordinator, Long),
    rpc("/ramsnap.host.v1.HostService/StopVm", Coordinator, Long),
    rpc("/ramsnap.host.v1.HostService/GetVmStatus", Viewer, Unary),
    rpc("/ramsnap.host.v1.HostService/ListVms", Viewer, Unary),
    rpc("/ramsnap.host.v1.HostService/WatchVmStatus", Viewer, Stream),
    rpc("/ramsnap.host.v1.HostService/ReadConsole", Viewer, Unary),
    rpc("/ramsnap.host.v1.HostService/SnapshotVm", Coordinator, Stream),
    rpc("/ramsnap.host.v1.HostService/CancelSnapshot", Coordinator, Long),
    rpc("/ramsnap.host.v1.HostService/VerifyMemory", Coordinator, Long),
    rpc(
        "/ramsnap.host.v1.HostService/InspectOvirtMemory",
        Coordinator,
        Long,
    ),
    rpc("/ramsnap.host.v1.HostService/ForgetVm", Coordinator, Unary),
    rpc("/ramsnap.host.v1.HostService/SuspendVm", Coordinator, Long),
    rpc("/ramsnap.host.v1.HostService/CommitVolume", Coordinator, Long),
    // Every server: health and reflection.
    any("/grpc.health.v1.Health/Check", Unary),
    any("/grpc.health.v1.Health/Watch", Stream),
    any(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        Stream,
    ),
    any(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        Stream,
    ),
];

/// The table entry for a request path; `None` for anything else (denied).
pub fn lookup(path: &str) -> Option<&'static Rpc> {
    static INDEX: OnceLock<HashMap<&'static str, &'static Rpc>> = OnceLock::new();
    INDEX
        .get_or_init(|| RPCS.iter().map(|r| (r.path, r)).collect())
        .get(path)
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use prost_types::FileDescriptorSet;
    use std::collections::BTreeMap;

    /// Every method of every service in the descriptor sets the servers
    /// register: path → (client streaming, server streaming).
    fn described() -> BTreeMap<String, (bool, bool)> {
        let sets = [
            ramsnap_proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ];
        let mut out = BTreeMap::new();
        for bytes in sets {
            let set = FileDescriptorSet::decode(bytes).expect("a descriptor set");
            for file in set.file {
                for service in &file.service {
                    for method in &service.method {
                        let path = format!("/{}.{}/{}", file.package(), service.name(), method.name());
                        out.insert(path, (method.client_streaming(), method.server_streaming()));
                    }
                }
            }
        }
        out
    }

    #[test]
    fn table_matches_the_descriptor_sets() {
        let described = described();
        let mut errors = Vec::new();
        for (path, (client_streaming, server_streaming)) in &described {
            match lookup(path) {
                None => errors.push(format!("{path} is in the protos but not in rpcs::RPCS")),
                Some(rpc) => {
                    if *server_streaming != (rpc.kind == CallKind::Stream) {
                        errors.push(format!(
                            "{path}: kind {:?} but server_streaming={server_streaming}",
                            rpc.kind
                        ));
                    }
                    if *client_streaming && !*server_streaming {
                        errors.push(format!("{path}: client streaming only; give it a kind first"));
                    }
                }
            }
        }
        for rpc in RPCS {
            if !described.contains_key(rpc.path) {
                errors.push(format!("{} is in rpcs::RPCS but in no proto", rpc.path));
            }
        }
        assert_eq!(lookup_count(), RPCS.len(), "duplicate paths in rpcs::RPCS");
        assert!(errors.is_empty(), "{}", errors.join("\n"));
    }

    fn lookup_count() -> usize {
        RPCS.iter()
            .map(|r| r.path)
            .collect::<std::collections::HashSet<_>>()
            .len()
    }

    #[test]
    fn roles_form_two_ladders() {
        assert!(Admin.satisfies(Operator) && Admin.satisfies(Viewer) && Operator.satisfies(Viewer));
        assert!(Coordinator.satisfies(Host) && Coordinator.satisfies(Viewer) && Host.satisfies(Viewer));
        assert!(!Admin.satisfies(Coordinator) && !Admin.satisfies(Host));
        assert!(!Coordinator.satisfies(Operator) && !Coordinator.satisfies(Admin));
        assert!(!Viewer.satisfies(Operator) && !Operator.satisfies(Admin) && !Host.satisfies(Coordinator));
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
        }
    }

    #[test]
    fn agents_only_obey_the_coordinator() {
        for rpc in RPCS
            .iter()
            .filter(|r| r.path.starts_with("/ramsnap.host.") || r.path.starts_with("/ramsnap.storage."))
        {
            if let Access::Role(role) = rpc.access {
                let ok = match role {
                    Viewer | Coordinator | Host => true,
                    // Only domain registration is the admin's on an agent.
                    Admin => rpc.path.ends_with("/RegisterDomain"),
                    Operator => false,
                };
                assert!(ok, "{} needs {role}", rpc.path);
            }
        }
        // The mutating calls of the coordinator are never the agents' roles.
        for rpc in RPCS.iter().filter(|r| r.path.starts_with("/ramsnap.snapshot.")) {
            assert!(
                !matches!(rpc.access, Access::Role(Coordinator | Host)),
                "{}",
                rpc.path
            );
        }
    }

    #[test]
    fn viewer_calls_are_reads() {
        for rpc in RPCS.iter().filter(|r| !r.is_mutating()) {
            let method = rpc.path.rsplit('/').next().unwrap();
            let read = ["Get", "List", "Watch", "Read", "Check", "ServerReflectionInfo"]
                .iter()
                .any(|p| method.starts_with(p));
            assert!(read, "{} is not mutating but does not look like a read", rpc.path);
        }
    }
}
