//! Who may call what: the policy (identities → roles), and [`AuthLayer`],
//! the tower layer every server puts in front of its services
//! (`Server::builder().layer(auth)`), which authenticates each call,
//! checks it against [`crate::rpcs::RPCS`], writes the audit trail
//! ([`crate::audit`]) and hands the [`Identity`] to the handlers.
//!
//! Decisions, in order; a refusal is a gRPC status answered at once (HTTP
//! 200, `grpc-status` in the headers, as tonic answers errors):
//! 1. Identity: an `authorization: Bearer <token>` header, when present,
//!    decides (and must be valid: a token the token file does not hold, or
//!    a server without a token file, is UNAUTHENTICATED); else the TLS
//!    client certificate (see [`crate::authn`]); else, on a plain-text
//!    loopback server ([`AuthMode::InsecureLoopback`]), the configured local
//!    identity with every role; else UNAUTHENTICATED.
//! 2. The RPC must be in the table, else PERMISSION_DENIED (reason
//!    `RPC_NOT_ALLOWED`): what is not listed is not allowed.
//! 3. One of the identity's roles must satisfy the RPC's, else
//!    PERMISSION_DENIED with an ErrorInfo: reason `ROLE_REQUIRED`, domain
//!    `ramsnap.io`, metadata `required_role`, `identity`, `rpc`.
//!
//! Policy file (`--authz-policy FILE`, JSON, reloaded when it changes; an
//! unknown key is an error, so a typo cannot silently grant nothing):
//! ```json
//! { "admin": ["spiffe://ramsnap/admin"],
//!   "operator": ["spiffe://ramsnap/operator", "ci-bot"],
//!   "viewer": ["spiffe://ramsnap/viewer"] }
//! ```
//! On an agent the same format names the coordinator, the host agents and
//! the admin:
//! ```json
//! { "coordinator": ["spiffe://ramsnap/coordinator"],
//!   "host": ["spiffe://ramsnap/host"],
//!   "admin": ["spiffe://ramsnap/admin"] }
//! ```
use crate::audit::{self, CallRecord};
use crate::authn::{self, Identity, IdentitySource, TokenTable};
use crate::fence::{self, Fences};
use crate::reload::{self, Reloadable};
use crate::rpcs::{self, Access, Role, RoleSet, Rpc};
use anyhow::Context as _;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The identities of the dev certificates ([`crate::devcerts`]) and of the
/// default policies.
pub mod spiffe {
    pub const COORDINATOR: &str = "spiffe://ramsnap/coordinator";
    pub const STORAGE: &str = "spiffe://ramsnap/storage";
    pub const HOST: &str = "spiffe://ramsnap/host";
    pub const ADMIN: &str = "spiffe://ramsnap/admin";
    pub const OPERATOR: &str = "spiffe://ramsnap/operator";
    pub const VIEWER: &str = "spiffe://ramsnap/viewer";
}

/// The identity every caller of a plain-text loopback server has, unless
/// configured otherwise.
pub const DEFAULT_LOCAL_IDENTITY: &str = "local-admin";

/// The ErrorInfo domain of authorization refusals.
pub const ERROR_DOMAIN: &str = "ramsnap.io";

/// Which roles each identity holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    grants: HashMap<String, RoleSet>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    admin: Vec<String>,
    #[serde(default)]
    operator: Vec<String>,
    #[serde(default)]
    viewer: Vec<String>,
    #[serde(default)]
    host: Vec<String>,
    #[serde(default)]
    coordinator: Vec<String>,
}

impl Policy {
    /// No grants: only health and reflection are allowed.
    pub fn empty() -> Policy {
        Policy::default()
    }

    /// Gives `identity` the role `role` (on top of any it holds).
    #[must_use]
    pub fn grant(mut self, role: Role, identity: &str) -> Policy {
        let set = self.grants.entry(identity.to_string()).or_default();
        *set = set.with(role);
        self
    }

    /// The coordinator's default: the dev certificates' admin, operator and
    /// viewer.
    pub fn coordinator_default() -> Policy {
        Policy::empty()
            .grant(Role::Admin, spiffe::ADMIN)
            .grant(Role::Operator, spiffe::OPERATOR)
            .grant(Role::Viewer, spiffe::VIEWER)
    }

    /// The agents' default: the coordinator, the host agents (for the
    /// storage agent) and the admin.
    pub fn agent_default() -> Policy {
        Policy::empty()
            .grant(Role::Coordinator, spiffe::COORDINATOR)
            .grant(Role::Host, spiffe::HOST)
            .grant(Role::Admin, spiffe::ADMIN)
    }

    /// Parses the JSON policy format (see the module documentation).
    pub fn from_json(text: &str) -> anyhow::Result<Policy> {
        let f: PolicyFile = serde_json::from_str(text).context("the policy (JSON: role → identities)")?;
        let mut p = Policy::empty();
        for (role, ids) in [
            (Role::Admin, f.admin),
            (Role::Operator, f.operator),
            (Role::Viewer, f.viewer),
            (Role::Host, f.host),
            (Role::Coordinator, f.coordinator),
        ] {
            for id in ids {
                anyhow::ensure!(!id.trim().is_empty(), "an empty identity under {role}");
                p = p.grant(role, &id);
            }
        }
        Ok(p)
    }

    pub fn load(path: &Path) -> anyhow::Result<Policy> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Policy::from_json(&text).with_context(|| format!("{}", path.display()))
    }

    /// The file, reloaded when it changes (every
    /// [`reload::DEFAULT_POLL_INTERVAL`] unless `interval` says otherwise).
    pub fn reloadable(path: &Path, interval: Option<Duration>) -> anyhow::Result<Reloadable<Policy>> {
        let p = path.to_path_buf();
        Reloadable::spawn(
            "authorization policy",
            vec![p.clone()],
            interval.unwrap_or(reload::DEFAULT_POLL_INTERVAL),
            move || Policy::load(&p),
        )
    }

    /// The roles `identity` holds (none if it is not named).
    pub fn roles_of(&self, identity: &str) -> RoleSet {
        self.grants.get(identity).copied().unwrap_or_default()
    }
}

/// Whether `identity` may call the RPC at `path`: its table entry, or the
/// PERMISSION_DENIED status to answer.
pub fn authorize(path: &str, identity: &Identity) -> Result<&'static Rpc, Status> {
    let Some(rpc) = rpcs::lookup(path) else {
        return Err(Status::with_error_details(
            Code::PermissionDenied,
            format!("{path} is not an RPC this policy allows"),
            ErrorDetails::with_error_info(
                "RPC_NOT_ALLOWED",
                ERROR_DOMAIN,
                HashMap::from([
                    ("identity".to_string(), identity.name.clone()),
                    ("rpc".to_string(), path.to_string()),
                ]),
            ),
        ));
    };
    match rpc.access {
        Access::Authenticated => Ok(rpc),
        Access::Role(required) if identity.has(required) => Ok(rpc),
        Access::Role(required) => Err(Status::with_error_details(
            Code::PermissionDenied,
            format!(
                "{path} requires the {required} role; {} does not hold it",
                identity.name
            ),
            ErrorDetails::with_error_info(
                "ROLE_REQUIRED",
                ERROR_DOMAIN,
                HashMap::from([
                    ("required_role".to_string(), required.to_string()),
                    ("identity".to_string(), identity.name.clone()),
                    ("rpc".to_string(), path.to_string()),
                ]),
            ),
        )),
    }
}

/// How callers of a server are identified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthMode {
    /// By TLS client certificate (or bearer token). A plain-text connection
    /// has no identity and is refused.
    Tls,
    /// A plain-text server on loopback (`--insecure`, checked by
    /// [`crate::tls::check_insecure_listen`]): every caller without a
    /// bearer token is `identity` and holds every role, since anyone who
    /// can reach the loopback port could reach it before this layer existed.
    /// The audit trail names the identity with source `insecure-loopback`.
    InsecureLoopback { identity: String },
}

impl AuthMode {
    /// [`AuthMode::InsecureLoopback`] as [`DEFAULT_LOCAL_IDENTITY`].
    pub fn insecure_loopback() -> AuthMode {
        AuthMode::InsecureLoopback {
            identity: DEFAULT_LOCAL_IDENTITY.to_string(),
        }
    }
}

#[derive(Clone)]
struct AuthShared {
    mode: AuthMode,
    policy: Reloadable<Policy>,
    tokens: Option<Reloadable<TokenTable>>,
    /// The highest saga generations seen (see [`crate::fence`]).
    fences: Arc<Fences>,
}

/// Authentication, authorization and audit for every call (see the module
/// documentation). Put it first: `Server::builder().layer(auth).layer(limits)`.
#[derive(Clone)]
pub struct AuthLayer {
    shared: Arc<AuthShared>,
}

impl std::fmt::Debug for AuthLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthLayer")
            .field("mode", &self.shared.mode)
            .field("tokens", &self.shared.tokens.is_some())
            .finish()
    }
}

impl AuthLayer {
    pub fn new(mode: AuthMode, policy: Reloadable<Policy>) -> AuthLayer {
        AuthLayer {
            shared: Arc::new(AuthShared {
                mode,
                policy,
                tokens: None,
                fences: Arc::default(),
            }),
        }
    }

    /// Also accepts the bearer tokens of a token file. A TLS server that
    /// takes tokens must let clients connect without a certificate:
    /// [`crate::tls::ClientAuth::Optional`].
    pub fn with_tokens(mut self, tokens: Reloadable<TokenTable>) -> AuthLayer {
        Arc::make_mut(&mut self.shared).tokens = Some(tokens);
        self
    }

    /// Who is calling, with the roles the current policy gives it.
    pub fn authenticate<B>(&self, req: &http::Request<B>) -> Result<Identity, Status> {
        let shared = &self.shared;
        let identity = |name: String, source| Identity {
            roles: shared.policy.current().roles_of(&name),
            name,
            source,
        };
        if let Some(value) = req.headers().get(http::header::AUTHORIZATION) {
            let Some(tokens) = &shared.tokens else {
                return Err(Status::unauthenticated(
                    "this server does not accept bearer tokens",
                ));
            };
            let token = authn::bearer_token(value)
                .ok_or_else(|| Status::unauthenticated("the authorization header is not `Bearer <token>`"))?;
            let name = tokens
                .current()
                .lookup(token)
                .map(str::to_string)
                .ok_or_else(|| Status::unauthenticated("unknown bearer token"))?;
            return Ok(identity(name, IdentitySource::Token));
        }
        if let Some(tls) = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>() {
            let certs = tls.peer_certs();
            let leaf = certs
                .as_ref()
                .and_then(|c| c.first())
                .ok_or_else(|| Status::unauthenticated("no client certificate and no bearer token"))?;
            let name = authn::certificate_identity(leaf).map_err(|e| {
                Status::unauthenticated(format!("the client certificate names no identity: {e:#}"))
            })?;
            return Ok(identity(name, IdentitySource::Certificate));
        }
        match &shared.mode {
            AuthMode::InsecureLoopback { identity } => Ok(Identity {
                name: identity.clone(),
                source: IdentitySource::InsecureLoopback,
                roles: RoleSet::all(),
            }),
            AuthMode::Tls => Err(Status::unauthenticated(
                "no TLS client certificate and no bearer token",
            )),
        }
    }
}

fn peer_addr<B>(req: &http::Request<B>) -> Option<SocketAddr> {
    let ext = req.extensions();
    ext.get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|t| t.get_ref().remote_addr())
        .or_else(|| ext.get::<TcpConnectInfo>().and_then(|t| t.remote_addr()))
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`AuthLayer`].
#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    layer: AuthLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower_service::Service<http::Request<B>> for AuthService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let start = Instant::now();
        let peer = peer_addr(&req);
        let path = req.uri().path().to_string();
        let identity = match self.layer.authenticate(&req) {
            Ok(identity) => identity,
            Err(status) => {
                audit::denied(&path, None, rpcs::lookup(&path), &status, peer);
                return Box::pin(async move { Ok(status.into_http()) });
            }
        };
        let rpc = match authorize(&path, &identity) {
            Ok(rpc) => rpc,
            Err(status) => {
                audit::denied(&path, Some(&identity), rpcs::lookup(&path), &status, peer);
                return Box::pin(async move { Ok(status.into_http()) });
            }
        };
        // A mutating call made for a saga is refused once a newer owner of
        // that saga has called (the coordinator's fencing, see `fence`).
        let fence = if rpc.is_mutating() {
            match fence::from_headers(req.headers()).and_then(|f| {
                f.map(|f| self.layer.shared.fences.admit(f).map(|()| f))
                    .transpose()
            }) {
                Ok(f) => f,
                Err(status) => {
                    audit::denied(&path, Some(&identity), Some(rpc), &status, peer);
                    return Box::pin(async move { Ok(status.into_http()) });
                }
            }
        } else {
            None
        };
        // Every call is measured; the mutating ones are logged too.
        let record = Some(CallRecord {
            identity: identity.clone(),
            rpc,
            peer,
            start,
            span: tracing::Span::current(),
            fence,
            log: rpc.is_mutating(),
        });
        req.extensions_mut().insert(identity);
        // The clone that was polled ready is the one to call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let response = inner.call(req).await?;
            Ok(match record {
                Some(record) => record.finish_with(response),
                None => response,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(name: &str, roles: RoleSet) -> Identity {
        Identity {
            name: name.into(),
            source: IdentitySource::Certificate,
            roles,
        }
    }

    #[test]
    fn policy_file() {
        let p = Policy::from_json(r#"{"admin": ["a"], "viewer": ["v", "a"], "coordinator": ["c"]}"#).unwrap();
        assert!(p.roles_of("a").contains(Role::Admin) && p.roles_of("a").contains(Role::Viewer));
        assert_eq!(p.roles_of("v"), RoleSet::EMPTY.with(Role::Viewer));
        assert!(p.roles_of("nobody").is_empty());
        let typo = Policy::from_json(r#"{"admins": ["a"]}"#).unwrap_err();
        assert!(format!("{typo:#}").contains("admins"), "{typo:#}");
        assert!(Policy::from_json(r#"{"admin": [""]}"#).is_err());
    }

    #[test]
    fn decisions() {
        let coordinator = Policy::coordinator_default();
        let agent = Policy::agent_default();
        let id = |p: &Policy, name: &str| who(name, p.roles_of(name));
        let viewer = id(&coordinator, spiffe::VIEWER);
        let operator = id(&coordinator, spiffe::OPERATOR);
        let admin = id(&coordinator, spiffe::ADMIN);

        assert!(authorize("/ramsnap.snapshot.v1.VmService/ListVms", &viewer).is_ok());
        let denied = authorize("/ramsnap.snapshot.v1.VmService/StopVm", &viewer).unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied);
        let info = denied.get_error_details().error_info().cloned().unwrap();
        assert_eq!(info.reason, "ROLE_REQUIRED");
        assert_eq!(info.metadata["required_role"], "operator");
        assert_eq!(info.metadata["identity"], spiffe::VIEWER);
        assert_eq!(info.metadata["rpc"], "/ramsnap.snapshot.v1.VmService/StopVm");
        assert!(authorize("/ramsnap.snapshot.v1.VmService/StopVm", &operator).is_ok());
        assert!(authorize("/ramsnap.snapshot.v1.ClusterService/AddHost", &operator).is_err());
        assert!(authorize("/ramsnap.snapshot.v1.ClusterService/AddHost", &admin).is_ok());
        assert!(authorize("/grpc.health.v1.Health/Check", &who("anyone", RoleSet::EMPTY)).is_ok());
        let unknown = authorize("/ramsnap.snapshot.v1.VmService/Nope", &admin).unwrap_err();
        assert_eq!(
            unknown.get_error_details().error_info().unwrap().reason,
            "RPC_NOT_ALLOWED"
        );

        // Agents.
        let c = id(&agent, spiffe::COORDINATOR);
        let h = id(&agent, spiffe::HOST);
        let a = id(&agent, spiffe::ADMIN);
        let op = id(&agent, spiffe::OPERATOR);
        assert!(authorize("/ramsnap.host.v1.HostService/RunVm", &c).is_ok());
        assert!(authorize("/ramsnap.host.v1.HostService/RunVm", &a).is_err());
        assert!(authorize("/ramsnap.host.v1.HostService/ListVms", &a).is_ok());
        assert!(authorize("/ramsnap.host.v1.HostService/ListVms", &op).is_err());
        assert!(authorize("/ramsnap.storage.v1.StorageService/RegisterDomain", &a).is_ok());
        assert!(authorize("/ramsnap.storage.v1.StorageService/RegisterDomain", &c).is_err());
        assert!(authorize("/ramsnap.storage.v1.StorageService/CreateVolume", &a).is_err());
        assert!(authorize("/ramsnap.storage.v1.StorageService/PrepareVolume", &h).is_ok());
        assert!(authorize("/ramsnap.storage.v1.StorageService/PrepareVolume", &c).is_ok());
        assert!(authorize("/ramsnap.storage.v1.StorageService/GetVolume", &h).is_ok());
        assert!(authorize("/ramsnap.storage.v1.StorageService/DeleteVolume", &h).is_err());
        assert!(authorize("/ramsnap.host.v1.HostService/StopVm", &h).is_err());
        // The coordinator identity is nobody on the coordinator itself.
        assert!(authorize(
            "/ramsnap.snapshot.v1.VmService/ListVms",
            &id(&coordinator, spiffe::COORDINATOR)
        )
        .is_err());
    }
}
