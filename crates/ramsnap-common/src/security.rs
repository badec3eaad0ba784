//! The security of a binary in one place: the command-line flags (clap,
//! each with its environment variable) and what they build — a server's
//! transport, auth layer and limits ([`ServerSecurity`]), and a client's
//! transport ([`ClientTransport`]).
//!
//! Servers (`ramsnap-snapshot`, `ramsnap-storage`, `ramsnap-host`,
//! `ramsnapd`) flatten [`ServerSecurityArgs`]; the CLI flattens
//! [`ClientSecurityArgs`]. Exactly one of these must be chosen for a server:
//! - `--tls-cert`, `--tls-key`, `--tls-client-ca` (production; for example a
//!   cert-manager Secret mounted as files, reloaded when it changes);
//! - `--tls-dir DIR`: the dev certificates of [`crate::devcerts`], made on
//!   first use (the embedded `ramsnapd`);
//! - `--insecure`: plain text, every caller the local identity with every
//!   role; refused unless the listen address is loopback.
use crate::authn::TokenTable;
use crate::authz::{AuthLayer, AuthMode, Policy, DEFAULT_LOCAL_IDENTITY};
use crate::devcerts;
use crate::limits::{self, Limits, LimitsLayer};
use crate::reload::Reloadable;
use crate::tls::{ClientAuth, ClientTls, ClientTransport, ServerTls, ServerTransport, TlsFiles};
use anyhow::Context as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the dev certificates of a default installation live: the CLI
/// looks there when no TLS flag is given.
pub const DEFAULT_DEV_CERTS_DIR: &str = "/var/lib/ramsnap/tls";

/// Which default policy a server gets when no `--authz-policy` is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerKind {
    /// The coordinator: admin, operator and viewer of the dev certificates.
    Coordinator,
    /// A storage or host agent: the coordinator, the host agents, the admin.
    Agent,
}

/// Everything a server needs, built from [`ServerSecurityArgs`].
#[derive(Clone, Debug)]
pub struct ServerSecurity {
    pub transport: ServerTransport,
    pub auth: AuthLayer,
    pub limits: LimitsLayer,
}

impl ServerSecurity {
    /// The two layers, outermost first: `builder.layer(a).layer(b)`.
    pub fn layers(&self) -> (AuthLayer, LimitsLayer) {
        (self.auth.clone(), self.limits.clone())
    }
}

/// A server's security flags (see the module documentation).
#[derive(clap::Args, Clone, Debug, Default)]
#[command(next_help_heading = "Security")]
pub struct ServerSecurityArgs {
    /// This server's certificate chain, PEM, leaf first. Reloaded when it
    /// changes.
    #[arg(long, env = "RAMSNAP_TLS_CERT", value_name = "FILE", requires_all = ["tls_key", "tls_client_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// Its private key, PEM.
    #[arg(long, env = "RAMSNAP_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The CA(s) that client certificates must chain to, PEM.
    #[arg(
        long,
        env = "RAMSNAP_TLS_CLIENT_CA",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_client_ca: Option<PathBuf>,
    /// The CA(s) of the servers this one calls (the agents, for the
    /// coordinator; the storage agent, for a host agent). Default: the
    /// client CA. It presents its own certificate to them.
    #[arg(long, env = "RAMSNAP_TLS_SERVER_CA", value_name = "FILE")]
    pub tls_server_ca: Option<PathBuf>,
    /// The name the servers this one calls must present a certificate for,
    /// instead of the host of their address (agents addressed by IP).
    #[arg(long, env = "RAMSNAP_TLS_SERVER_NAME", value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// Use (and make on first use) the dev certificates in DIR.
    #[arg(
        long,
        env = "RAMSNAP_TLS_DIR",
        value_name = "DIR",
        conflicts_with = "tls_cert"
    )]
    pub tls_dir: Option<PathBuf>,
    /// Plain text and no authentication: every caller is the local identity
    /// with every role. Only on a loopback listen address.
    #[arg(long, env = "RAMSNAP_INSECURE", conflicts_with_all = ["tls_cert", "tls_dir"])]
    pub insecure: bool,
    /// The identity of every caller in --insecure mode (audit trail).
    #[arg(long, env = "RAMSNAP_LOCAL_IDENTITY", default_value = DEFAULT_LOCAL_IDENTITY, value_name = "NAME")]
    pub local_identity: String,
    /// Who holds which role: JSON `{"admin": [ids], "operator": [...],
    /// "viewer": [...], "coordinator": [...], "host": [...]}`. Reloaded when
    /// it changes. Default: the dev certificates' identities.
    #[arg(long, env = "RAMSNAP_AUTHZ_POLICY", value_name = "FILE")]
    pub authz_policy: Option<PathBuf>,
    /// Bearer tokens, lines of `TOKEN IDENTITY`; makes client certificates
    /// optional (a caller then needs a certificate or a token). Reloaded.
    #[arg(long, env = "RAMSNAP_AUTH_TOKENS", value_name = "FILE")]
    pub auth_tokens: Option<PathBuf>,
    /// Calls (unary) in progress at once; more are refused with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "RAMSNAP_MAX_CONCURRENT_CALLS", default_value_t = limits::DEFAULT_MAX_CONCURRENT_CALLS)]
    pub max_concurrent_calls: usize,
    /// Response streams open at once.
    #[arg(long, env = "RAMSNAP_MAX_CONCURRENT_STREAMS", default_value_t = limits::DEFAULT_MAX_CONCURRENT_STREAMS)]
    pub max_concurrent_streams: usize,
    /// Time limit of a unary call in seconds (0: none); long calls and
    /// streams have none.
    #[arg(long, env = "RAMSNAP_UNARY_TIMEOUT_SECS", default_value_t = limits::DEFAULT_UNARY_TIMEOUT.as_secs())]
    pub unary_timeout_secs: u64,
}

impl ServerSecurityArgs {
    fn limits(&self) -> Limits {
        Limits {
            max_concurrent_calls: self.max_concurrent_calls.max(1),
            max_concurrent_streams: self.max_concurrent_streams.max(1),
            unary_timeout: (self.unary_timeout_secs > 0)
                .then(|| Duration::from_secs(self.unary_timeout_secs)),
            queue_wait: limits::DEFAULT_QUEUE_WAIT,
        }
    }

    /// The files of this server's certificate: explicit, or `dev_name`'s in
    /// the dev directory (made if needed); `None` in --insecure mode.
    fn files(&self, dev_name: &str) -> anyhow::Result<Option<TlsFiles>> {
        if self.insecure {
            return Ok(None);
        }
        if let (Some(cert), Some(key), Some(ca)) = (&self.tls_cert, &self.tls_key, &self.tls_client_ca) {
            return Ok(Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            }));
        }
        if let Some(dir) = &self.tls_dir {
            return Ok(Some(devcerts::ensure_dev_certs(dir)?.files(dev_name)));
        }
        anyhow::bail!(
            "no TLS configuration: give --tls-cert, --tls-key and --tls-client-ca, or --tls-dir for dev \
             certificates, or --insecure on a loopback address"
        )
    }

    /// The security of a server listening on `listen`. `dev_name` picks its
    /// certificate in `--tls-dir` (`coordinator`, `storage`, `host`).
    pub fn server(
        &self,
        kind: ServerKind,
        dev_name: &str,
        listen: SocketAddr,
    ) -> anyhow::Result<ServerSecurity> {
        let policy = match &self.authz_policy {
            Some(path) => Policy::reloadable(path, None)?,
            None => Reloadable::fixed(match kind {
                ServerKind::Coordinator => Policy::coordinator_default(),
                ServerKind::Agent => Policy::agent_default(),
            }),
        };
        let tokens = self
            .auth_tokens
            .as_deref()
            .map(|p| TokenTable::reloadable(p, None))
            .transpose()?;
        let (transport, mode) = match self.files(dev_name)? {
            None => (
                ServerTransport::insecure(listen)?,
                AuthMode::InsecureLoopback {
                    identity: self.local_identity.clone(),
                },
            ),
            Some(files) => {
                let client_auth = if tokens.is_some() {
                    ClientAuth::Optional
                } else {
                    ClientAuth::Required
                };
                (
                    ServerTransport::Tls(ServerTls::new(files, client_auth)?),
                    AuthMode::Tls,
                )
            }
        };
        let mut auth = AuthLayer::new(mode, policy);
        if let Some(tokens) = tokens {
            auth = auth.with_tokens(tokens);
        }
        Ok(ServerSecurity {
            transport,
            auth,
            limits: LimitsLayer::new(self.limits()),
        })
    }

    /// How this server calls others, presenting its own certificate
    /// (`dev_name`'s in `--tls-dir`).
    pub fn client(&self, dev_name: &str) -> anyhow::Result<ClientTransport> {
        let Some(mut files) = self.files(dev_name)? else {
            return Ok(ClientTransport::Insecure);
        };
        if let Some(ca) = &self.tls_server_ca {
            files.ca = ca.clone();
        }
        let mut tls = ClientTls::new(files)?;
        if let Some(name) = &self.tls_server_name {
            tls = tls.with_server_name(name)?;
        }
        Ok(ClientTransport::Tls(tls))
    }
}

/// The CLI's security flags. Without any, the dev certificates of
/// [`DEFAULT_DEV_CERTS_DIR`] are used as `admin` when they exist.
#[derive(clap::Args, Clone, Debug, Default)]
#[command(next_help_heading = "Security")]
pub struct ClientSecurityArgs {
    /// Client certificate, PEM.
    #[arg(long, global = true, env = "RAMSNAP_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// Its private key, PEM.
    #[arg(long, global = true, env = "RAMSNAP_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// The CA that server certificates must chain to, PEM.
    #[arg(long, global = true, env = "RAMSNAP_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Expect server certificates for NAME instead of the address's host.
    #[arg(long, global = true, env = "RAMSNAP_TLS_SERVER_NAME", value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// Dev certificates directory (ca.pem, NAME.pem, NAME.key).
    #[arg(long, global = true, env = "RAMSNAP_TLS_DIR", value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Which dev certificate to present: admin, operator, viewer, ...
    #[arg(
        long = "as",
        global = true,
        env = "RAMSNAP_AS",
        default_value = "admin",
        value_name = "NAME"
    )]
    pub tls_identity: String,
    /// Plain text, for servers run with --insecure on loopback.
    #[arg(long, global = true, env = "RAMSNAP_INSECURE")]
    pub insecure: bool,
    /// Bearer token to send (for servers with --auth-tokens); never over
    /// plain text to another machine.
    #[arg(
        long,
        global = true,
        env = "RAMSNAP_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
}

impl ClientSecurityArgs {
    /// The transport the flags describe.
    pub fn transport(&self) -> anyhow::Result<ClientTransport> {
        self.transport_with_default_dir(Path::new(DEFAULT_DEV_CERTS_DIR))
    }

    fn transport_with_default_dir(&self, default_dir: &Path) -> anyhow::Result<ClientTransport> {
        if self.insecure {
            anyhow::ensure!(
                self.tls_cert.is_none() && self.tls_key.is_none(),
                "--insecure and a client certificate exclude each other"
            );
            return Ok(ClientTransport::Insecure);
        }
        let files = match (&self.tls_cert, &self.tls_key, &self.tls_ca, &self.tls_dir) {
            (Some(cert), Some(key), Some(ca), _) => TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            },
            (None, None, _, Some(dir)) => TlsFiles::in_dir(dir, &self.tls_identity),
            (None, None, None, None) if default_dir.join("ca.pem").exists() => {
                TlsFiles::in_dir(default_dir, &self.tls_identity)
            }
            _ => anyhow::bail!(
                "no TLS client certificate: give --tls-cert, --tls-key and --tls-ca, or --tls-dir (and \
                 --as), or --insecure for a server on loopback run with --insecure"
            ),
        };
        let mut tls = ClientTls::new(files.clone()).with_context(|| {
            format!(
                "the client certificate {} (--tls-cert, --tls-dir, --as)",
                files.cert.display()
            )
        })?;
        if let Some(name) = &self.tls_server_name {
            tls = tls.with_server_name(name)?;
        }
        Ok(ClientTransport::Tls(tls))
    }

    /// The interceptor that adds `--token` to every call (a no-op without).
    pub fn bearer(&self) -> anyhow::Result<crate::authn::Bearer> {
        crate::authn::Bearer::new(self.token.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Server {
        #[command(flatten)]
        security: ServerSecurityArgs,
    }

    #[derive(Parser, Debug)]
    struct Client {
        #[command(flatten)]
        security: ClientSecurityArgs,
    }

    fn server(args: &[&str]) -> Result<ServerSecurityArgs, clap::Error> {
        Server::try_parse_from(std::iter::once("server").chain(args.iter().copied())).map(|s| s.security)
    }

    #[test]
    fn flags_are_well_formed() {
        use clap::CommandFactory;
        Server::command().debug_assert();
        Client::command().debug_assert();
        assert!(server(&["--insecure", "--tls-dir", "/x"]).is_err());
        assert!(server(&["--tls-cert", "/x"]).is_err(), "cert without key and CA");
        let defaults = server(&[]).unwrap();
        assert_eq!(
            defaults.max_concurrent_calls,
            limits::DEFAULT_MAX_CONCURRENT_CALLS
        );
        assert_eq!(defaults.limits(), Limits::default());
        assert_eq!(
            server(&["--unary-timeout-secs", "0"])
                .unwrap()
                .limits()
                .unary_timeout,
            None
        );
    }

    #[tokio::test]
    async fn servers_need_a_choice_and_insecure_needs_loopback() {
        let any: SocketAddr = "0.0.0.0:50051".parse().unwrap();
        let lo: SocketAddr = "127.0.0.1:50051".parse().unwrap();
        let err = server(&[])
            .unwrap()
            .server(ServerKind::Agent, "host", lo)
            .unwrap_err();
        assert!(err.to_string().contains("no TLS configuration"), "{err}");
        let insecure = server(&["--insecure"]).unwrap();
        let err = insecure
            .server(ServerKind::Coordinator, "coordinator", any)
            .unwrap_err();
        assert!(
            err.to_string().contains("only allowed on a loopback address"),
            "{err}"
        );
        let ok = insecure
            .server(ServerKind::Coordinator, "coordinator", lo)
            .unwrap();
        assert!(matches!(ok.transport, ServerTransport::InsecureLoopback));
        assert!(matches!(
            insecure.client("coordinator").unwrap(),
            ClientTransport::Insecure
        ));

        let dir = tempfile::tempdir().unwrap();
        let dev = server(&["--tls-dir", dir.path().to_str().unwrap()]).unwrap();
        let s = dev.server(ServerKind::Agent, "storage", any).unwrap();
        assert!(matches!(s.transport, ServerTransport::Tls(_)));
        assert!(dir.path().join("storage.key").exists());
        assert!(matches!(dev.client("host").unwrap(), ClientTransport::Tls(_)));
    }

    #[tokio::test]
    async fn the_cli_finds_its_certificate() {
        let client = |args: &[&str]| {
            Client::try_parse_from(std::iter::once("ramsnap").chain(args.iter().copied()))
                .unwrap()
                .security
        };
        let dir = tempfile::tempdir().unwrap();
        devcerts::ensure_dev_certs(dir.path()).unwrap();
        let nowhere = dir.path().join("nowhere");
        assert!(matches!(
            client(&["--insecure"])
                .transport_with_default_dir(&nowhere)
                .unwrap(),
            ClientTransport::Insecure
        ));
        let err = client(&[]).transport_with_default_dir(&nowhere).unwrap_err();
        assert!(err.to_string().contains("no TLS client certificate"), "{err}");
        // The default directory, as admin; another identity with --as.
        assert!(matches!(
            client(&[]).transport_with_default_dir(dir.path()).unwrap(),
            ClientTransport::Tls(_)
        ));
        let d = dir.path().to_str().unwrap();
        client(&["--tls-dir", d, "--as", "viewer"])
            .transport_with_default_dir(&nowhere)
            .unwrap();
        let err = client(&["--tls-dir", d, "--as", "nobody"])
            .transport_with_default_dir(&nowhere)
            .unwrap_err();
        assert!(format!("{err:#}").contains("nobody.pem"), "{err:#}");
    }
}
