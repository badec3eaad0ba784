//! Who is calling: the identity in the peer's TLS certificate, or the one a
//! bearer token maps to.
//!
//! A certificate's identity is its first URI SAN (`spiffe://ramsnap/admin`),
//! else its first DNS SAN, else its subject CN. The certificate has been
//! verified against the configured CA by the TLS handshake already.
//!
//! Token file (`--auth-tokens FILE`, reloaded like the certificates): one
//! `TOKEN IDENTITY` pair per line, separated by white space; blank lines and
//! lines starting with `#` are ignored. Tokens are at least
//! [`MIN_TOKEN_LEN`] characters, unique, and never logged (only line numbers
//! are); they are kept as SHA-256 digests and compared in constant time.
//! Keep the file mode 0600 (a warning is logged otherwise).
//! ```text
//! # token                                   identity
//! 3q2+7wAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA  spiffe://ramsnap/ci-bot
//! ```
use crate::reload::{self, Reloadable};
use crate::rpcs::{Role, RoleSet};
use anyhow::Context as _;
use sha2::{Digest, Sha256};
use std::fmt;
use std::path::Path;
use std::time::Duration;
use subtle::ConstantTimeEq;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// The shortest token accepted in a token file.
pub const MIN_TOKEN_LEN: usize = 16;

/// How the caller proved who it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdentitySource {
    /// Its TLS client certificate.
    Certificate,
    /// A bearer token from the token file.
    Token,
    /// Nothing: a plain-text server on loopback (`--insecure`) treats every
    /// caller as its configured local identity.
    InsecureLoopback,
}

impl IdentitySource {
    pub fn as_str(self) -> &'static str {
        match self {
            IdentitySource::Certificate => "certificate",
            IdentitySource::Token => "token",
            IdentitySource::InsecureLoopback => "insecure-loopback",
        }
    }
}

/// The authenticated caller of a request, with the roles the policy gives
/// it. [`crate::authz::AuthLayer`] puts it into each request's extensions:
/// handlers read it with `request.extensions().get::<Identity>()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub source: IdentitySource,
    pub roles: RoleSet,
}

impl Identity {
    /// The identity of a tonic request, if it went through the auth layer.
    pub fn of<T>(request: &tonic::Request<T>) -> Option<&Identity> {
        request.extensions().get::<Identity>()
    }

    /// Whether one of its roles satisfies `required`.
    pub fn has(&self, required: Role) -> bool {
        self.roles.satisfies(required)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// The identity a (verified) DER certificate names: first URI SAN, else
/// first DNS SAN, else subject CN.
pub fn certificate_identity(der: &[u8]) -> anyhow::Result<String> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| anyhow::anyhow!("parsing the certificate: {e}"))?;
    if let Some(san) = cert
        .subject_alternative_name()
        .map_err(|e| anyhow::anyhow!("its subjectAltName: {e}"))?
    {
        let names = &san.value.general_names;
        let uri = names.iter().find_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        });
        let dns = names.iter().find_map(|n| match n {
            GeneralName::DNSName(d) => Some(*d),
            _ => None,
        });
        if let Some(name) = uri.or(dns).filter(|n| !n.is_empty()) {
            return Ok(name.to_string());
        }
    }
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .filter(|cn| !cn.is_empty());
    cn.map(str::to_string)
        .context("the certificate names no URI or DNS subjectAltName and no common name")
}

/// The bearer tokens of a token file (see the module documentation).
#[derive(Default)]
pub struct TokenTable {
    entries: Vec<([u8; 32], String)>,
}

impl fmt::Debug for TokenTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the digests either.
        f.debug_struct("TokenTable")
            .field("tokens", &self.entries.len())
            .finish()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl TokenTable {
    /// Parses a token file's text. Errors name lines, never tokens.
    pub fn parse(text: &str) -> anyhow::Result<TokenTable> {
        let mut entries: Vec<([u8; 32], String)> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let (Some(token), Some(identity), None) = (words.next(), words.next(), words.next()) else {
                anyhow::bail!("line {n}: expected `TOKEN IDENTITY`");
            };
            anyhow::ensure!(
                token.len() >= MIN_TOKEN_LEN,
                "line {n}: the token is shorter than {MIN_TOKEN_LEN} characters"
            );
            let d = digest(token);
            anyhow::ensure!(
                !entries.iter().any(|(e, _)| bool::from(e.ct_eq(&d))),
                "line {n}: the same token is on an earlier line"
            );
            entries.push((d, identity.to_string()));
        }
        Ok(TokenTable { entries })
    }

    /// Reads and parses a token file; warns when others may read it.
    pub fn load(path: &Path) -> anyhow::Result<TokenTable> {
        use std::os::unix::fs::PermissionsExt;
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        if let Ok(m) = std::fs::metadata(path) {
            if m.permissions().mode() & 0o077 != 0 {
                tracing::warn!(file = %path.display(), "the token file is readable by others; make it 0600");
            }
        }
        TokenTable::parse(&text).with_context(|| format!("{}", path.display()))
    }

    /// The file, reloaded when it changes (every
    /// [`reload::DEFAULT_POLL_INTERVAL`] unless `interval` says otherwise).
    pub fn reloadable(path: &Path, interval: Option<Duration>) -> anyhow::Result<Reloadable<TokenTable>> {
        let p = path.to_path_buf();
        Reloadable::spawn(
            "bearer tokens",
            vec![p.clone()],
            interval.unwrap_or(reload::DEFAULT_POLL_INTERVAL),
            move || TokenTable::load(&p),
        )
    }

    /// The identity `token` maps to. Every entry is compared, in constant
    /// time, whatever matches.
    pub fn lookup(&self, token: &str) -> Option<&str> {
        let d = digest(token);
        let mut found = None;
        for (entry, identity) in &self.entries {
            if bool::from(entry.ct_eq(&d)) && found.is_none() {
                found = Some(identity.as_str());
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A client interceptor that sends a bearer token with every call (none
/// when made without one): `XClient::with_interceptor(channel, bearer)`.
#[derive(Clone, Default)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl fmt::Debug for Bearer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Bearer(<token>)"
        } else {
            "Bearer(none)"
        })
    }
}

impl Bearer {
    pub fn new(token: Option<&str>) -> anyhow::Result<Bearer> {
        let Some(token) = token else {
            return Ok(Bearer(None));
        };
        anyhow::ensure!(
            !token.is_empty() && !token.contains(char::is_whitespace),
            "a bearer token is one word"
        );
        let mut value: tonic::metadata::MetadataValue<_> = format!("Bearer {token}")
            .parse()
            .map_err(|_| anyhow::anyhow!("a bearer token must be printable ASCII"))?;
        value.set_sensitive(true);
        Ok(Bearer(Some(value)))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// The token of an `authorization: Bearer <token>` header value; `None` if
/// the value is not of that form.
pub fn bearer_token(value: &http::HeaderValue) -> Option<&str> {
    let v = value.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file() {
        let t = TokenTable::parse(
            "# comment\n\n  aaaaaaaaaaaaaaaaaaaa  spiffe://ramsnap/ci \nbbbbbbbbbbbbbbbbbbbb\tviewer-bot\n",
        )
        .unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.lookup("aaaaaaaaaaaaaaaaaaaa"), Some("spiffe://ramsnap/ci"));
        assert_eq!(t.lookup("bbbbbbbbbbbbbbbbbbbb"), Some("viewer-bot"));
        assert_eq!(t.lookup("aaaaaaaaaaaaaaaaaaab"), None);
        assert_eq!(t.lookup(""), None);
        assert!(!format!("{t:?}").contains("aaaa"));

        let short = TokenTable::parse("short id\n").unwrap_err().to_string();
        assert!(short.contains("line 1") && !short.contains("short id"), "{short}");
        let dup = TokenTable::parse("cccccccccccccccccccc a\ncccccccccccccccccccc b\n").unwrap_err();
        assert!(dup.to_string().contains("line 2") && !dup.to_string().contains("cccc"));
        assert!(TokenTable::parse("dddddddddddddddddddd\n").is_err());
        assert!(TokenTable::parse("dddddddddddddddddddd a b\n").is_err());
    }

    #[test]
    fn bearer_header() {
        let h = |s: &str| http::HeaderValue::from_str(s).unwrap();
        assert_eq!(bearer_token(&h("Bearer abc")), Some("abc"));
        assert_eq!(bearer_token(&h("bearer  abc ")), Some("abc"));
        assert_eq!(bearer_token(&h("Basic abc")), None);
        assert_eq!(bearer_token(&h("Bearer ")), None);
        assert_eq!(bearer_token(&h("Bearer")), None);
    }

    #[test]
    fn identity_from_certificates() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = |sans: Vec<rcgen::SanType>, cn: Option<&str>| {
            let mut p = rcgen::CertificateParams::default();
            p.distinguished_name = rcgen::DistinguishedName::new();
            if let Some(cn) = cn {
                p.distinguished_name.push(rcgen::DnType::CommonName, cn);
            }
            p.subject_alt_names = sans;
            p.self_signed(&key).unwrap().der().to_vec()
        };
        let uri = rcgen::SanType::URI("spiffe://ramsnap/admin".try_into().unwrap());
        let dns = rcgen::SanType::DnsName("agent.example".try_into().unwrap());
        assert_eq!(
            certificate_identity(&cert(vec![dns.clone(), uri], Some("cn"))).unwrap(),
            "spiffe://ramsnap/admin"
        );
        assert_eq!(
            certificate_identity(&cert(vec![dns], Some("cn"))).unwrap(),
            "agent.example"
        );
        assert_eq!(
            certificate_identity(&cert(vec![], Some("just-cn"))).unwrap(),
            "just-cn"
        );
        assert!(certificate_identity(&cert(vec![], None)).is_err());
        assert!(certificate_identity(b"not a certificate").is_err());
    }
}
