//! Development certificates: a local CA and one certificate per ramsnap
//! identity, made on first use, for the embedded `ramsnapd`, the CLI beside
//! it, and tests. Production brings its own CA (cert-manager, SPIFFE).
//!
//! Layout of the directory (0700; keys 0600):
//!
//! | files | identity (URI SAN) | also | use |
//! |---|---|---|---|
//! | `ca.pem`, `ca.key` | CN `ramsnap dev CA <8 hex digits>` | | trust anchor for servers and clients |
//! | `coordinator.{pem,key}` | `spiffe://ramsnap/coordinator` | DNS `localhost`, IP `127.0.0.1`, `::1` | server certificate, and client certificate to the agents |
//! | `storage.{pem,key}`, `host.{pem,key}` | `spiffe://ramsnap/storage`, `…/host` | same | agents' server certificates; `host` is also the host agent's client certificate to its storage agent |
//! | `admin`, `operator`, `viewer` `.{pem,key}` | `spiffe://ramsnap/<name>` | | client certificates for the CLI |
//!
//! [`ensure_dev_certs`] is idempotent: it keeps every file that is still
//! good (parses, matches its key, is signed by the CA, names the right
//! identity, is valid for at least [`RENEW_BEFORE_DAYS`] more days) and
//! remakes the rest; a new CA remakes every certificate. Files are written
//! atomically (temporary file, rename) under an exclusive lock on
//! `<dir>/.lock`, so `ramsnapd` and a CLI starting together agree on one CA.
use crate::tls::TlsFiles;
use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// Services: server certificates, also valid as client certificates.
pub const SERVICES: [&str; 3] = ["coordinator", "storage", "host"];
/// People and tools: client certificates.
pub const CLIENTS: [&str; 3] = ["admin", "operator", "viewer"];

pub const CA_VALIDITY_DAYS: i64 = 3650;
pub const LEAF_VALIDITY_DAYS: i64 = 365;
/// A certificate with less time left than this is remade.
pub const RENEW_BEFORE_DAYS: i64 = 30;

/// The identity (URI SAN) of a dev certificate.
pub fn spiffe_id(name: &str) -> String {
    format!("spiffe://ramsnap/{name}")
}

/// A directory of dev certificates (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevCerts {
    pub dir: PathBuf,
}

impl DevCerts {
    /// The files of `name` (one of [`SERVICES`] or [`CLIENTS`]) with the CA.
    pub fn files(&self, name: &str) -> TlsFiles {
        TlsFiles::in_dir(&self.dir, name)
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
}

/// Makes (or keeps) the dev CA and certificates under `dir`.
pub fn ensure_dev_certs(dir: &Path) -> anyhow::Result<DevCerts> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let _lock = lock(dir)?;

    let (issuer, ca_der, new_ca) = match load_ca(dir) {
        Ok((issuer, der)) => (issuer, der, false),
        Err(reason) => {
            tracing::info!(dir = %dir.display(), %reason, "making a new dev CA");
            let (issuer, der) = make_ca(dir)?;
            (issuer, der, true)
        }
    };
    let (_, ca_cert) = X509Certificate::from_der(&ca_der).map_err(|e| anyhow::anyhow!("the dev CA: {e}"))?;

    for (names, server) in [(&SERVICES[..], true), (&CLIENTS[..], false)] {
        for name in names {
            let keep = !new_ca && leaf_is_good(dir, name, &ca_cert).is_ok();
            if !keep {
                make_leaf(dir, name, server, &issuer)?;
            }
        }
    }
    Ok(DevCerts {
        dir: dir.to_path_buf(),
    })
}

struct Lock(fs::File);

impl Drop for Lock {
    fn drop(&mut self) {
        // SAFETY: flock on a descriptor this struct owns.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

fn lock(dir: &Path) -> anyhow::Result<Lock> {
    let path = dir.join(".lock");
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a descriptor we own; blocks until the lock is ours.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("locking {}", path.display()));
    }
    Ok(Lock(f))
}

/// Writes `contents` to `dir/name` atomically with `mode`.
fn write_atomic(dir: &Path, name: &str, contents: &str, mode: u32) -> anyhow::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(name);
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, &path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    // An hour of slack for clocks that are a little behind.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
}

fn random_serial() -> SerialNumber {
    let mut bytes = *uuid::Uuid::new_v4().as_bytes();
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte to trim
    SerialNumber::from_slice(&bytes)
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    // A name of its own, so that a certificate from another machine's dev
    // CA is refused as from an unknown issuer, not as a bad signature.
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
    p.distinguished_name
        .push(DnType::CommonName, format!("ramsnap dev CA {tag}"));
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

fn make_ca(dir: &Path) -> anyhow::Result<(Issuer<'static, KeyPair>, Vec<u8>)> {
    let key = KeyPair::generate()?;
    let mut params = ca_params();
    validity(&mut params, CA_VALIDITY_DAYS);
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key)?;
    write_atomic(dir, "ca.key", &key.serialize_pem(), 0o600)?;
    write_atomic(dir, "ca.pem", &cert.pem(), 0o644)?;
    Ok((Issuer::new(params, key), cert.der().to_vec()))
}

fn load_ca(dir: &Path) -> Result<(Issuer<'static, KeyPair>, Vec<u8>), String> {
    let pem = fs::read_to_string(dir.join("ca.pem")).map_err(|e| format!("ca.pem: {e}"))?;
    let key = fs::read_to_string(dir.join("ca.key")).map_err(|e| format!("ca.key: {e}"))?;
    let key = KeyPair::from_pem(&key).map_err(|e| format!("ca.key: {e}"))?;
    let der = pem_to_der(&pem).map_err(|e| format!("ca.pem: {e}"))?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| format!("ca.pem: {e}"))?;
    if !cert.is_ca() {
        return Err("ca.pem is not a CA certificate".into());
    }
    check_time_left(&cert)?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err("ca.key does not match ca.pem".into());
    }
    cert.verify_signature(None).map_err(|e| format!("ca.pem: {e}"))?;
    // Issued certificates name the CA exactly as its certificate does.
    let issuer = Issuer::from_ca_cert_der(&der.as_slice().into(), key).map_err(|e| format!("ca.pem: {e}"))?;
    Ok((issuer, der))
}

fn pem_to_der(pem: &str) -> Result<Vec<u8>, String> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|c| c.to_vec())
        .map_err(|e| e.to_string())
}

fn check_time_left(cert: &X509Certificate<'_>) -> Result<(), String> {
    let left = cert.validity().time_to_expiration().ok_or("not valid now")?;
    if left < time::Duration::days(RENEW_BEFORE_DAYS) {
        return Err(format!("expires in {left}"));
    }
    Ok(())
}

fn leaf_is_good(dir: &Path, name: &str, ca: &X509Certificate<'_>) -> Result<(), String> {
    let pem = fs::read_to_string(dir.join(format!("{name}.pem"))).map_err(|e| e.to_string())?;
    let key = fs::read_to_string(dir.join(format!("{name}.key"))).map_err(|e| e.to_string())?;
    let key = KeyPair::from_pem(&key).map_err(|e| e.to_string())?;
    let der = pem_to_der(&pem)?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| e.to_string())?;
    cert.verify_signature(Some(ca.public_key()))
        .map_err(|e| format!("not signed by the CA: {e}"))?;
    check_time_left(&cert)?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err("the key does not match".into());
    }
    let id = spiffe_id(name);
    let names_it = cert.subject_alternative_name().ok().flatten().is_some_and(|san| {
        san.value
            .general_names
            .iter()
            .any(|n| matches!(n, GeneralName::URI(u) if *u == id))
    });
    if !names_it {
        return Err(format!("does not name {id}"));
    }
    Ok(())
}

fn make_leaf(dir: &Path, name: &str, server: bool, issuer: &Issuer<'_, KeyPair>) -> anyhow::Result<()> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, name);
    p.subject_alt_names = vec![SanType::URI(spiffe_id(name).try_into()?)];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if server {
        p.subject_alt_names.extend([
            SanType::DnsName("localhost".try_into()?),
            SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
            SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()),
        ]);
        p.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    p.use_authority_key_identifier_extension = true;
    p.serial_number = Some(random_serial());
    validity(&mut p, LEAF_VALIDITY_DAYS);
    let cert = p.signed_by(&key, issuer)?;
    write_atomic(dir, &format!("{name}.key"), &key.serialize_pem(), 0o600)?;
    write_atomic(dir, &format!("{name}.pem"), &cert.pem(), 0o644)?;
    tracing::info!(dir = %dir.display(), name, "made a dev certificate");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn read_all(dir: &Path) -> Vec<(String, String)> {
        let mut v: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "pem" || e == "key"))
            .map(|p| (p.display().to_string(), fs::read_to_string(&p).unwrap()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn made_once_then_kept_and_repaired() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("tls");
        let certs = ensure_dev_certs(&dir).unwrap();
        let first = read_all(&dir);
        assert_eq!(first.len(), 2 + 2 * (SERVICES.len() + CLIENTS.len()));
        assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        for name in SERVICES.iter().chain(CLIENTS.iter()) {
            let files = certs.files(name);
            assert_eq!(
                fs::metadata(&files.key).unwrap().permissions().mode() & 0o777,
                0o600
            );
            let der = pem_to_der(&fs::read_to_string(&files.cert).unwrap()).unwrap();
            assert_eq!(crate::authn::certificate_identity(&der).unwrap(), spiffe_id(name));
            // Each loads as a client configuration, services as servers too.
            crate::tls::load_client_config(&files).unwrap();
            if SERVICES.contains(name) {
                crate::tls::load_server_config(&files, crate::tls::ClientAuth::Required).unwrap();
            }
        }
        assert_eq!(
            fs::metadata(dir.join("ca.key")).unwrap().permissions().mode() & 0o777,
            0o600
        );

        // Idempotent.
        ensure_dev_certs(&dir).unwrap();
        assert_eq!(read_all(&dir), first);

        // A damaged or missing leaf is remade, the rest kept.
        fs::write(dir.join("viewer.pem"), "garbage").unwrap();
        fs::remove_file(dir.join("host.key")).unwrap();
        ensure_dev_certs(&dir).unwrap();
        let third = read_all(&dir);
        for ((path, a), (_, b)) in first.iter().zip(&third) {
            let remade =
                path.ends_with("viewer.pem") || path.ends_with("viewer.key") || path.contains("/host.");
            assert_eq!(a != b, remade, "{path}");
        }

        // A leaf from another CA is remade.
        let other = tempfile::tempdir().unwrap();
        ensure_dev_certs(other.path()).unwrap();
        fs::copy(other.path().join("admin.pem"), dir.join("admin.pem")).unwrap();
        fs::copy(other.path().join("admin.key"), dir.join("admin.key")).unwrap();
        ensure_dev_certs(&dir).unwrap();
        let ca = pem_to_der(&fs::read_to_string(dir.join("ca.pem")).unwrap()).unwrap();
        let (_, ca) = X509Certificate::from_der(&ca).unwrap();
        leaf_is_good(&dir, "admin", &ca).unwrap();

        // A new CA remakes everything.
        fs::remove_file(dir.join("ca.key")).unwrap();
        ensure_dev_certs(&dir).unwrap();
        let fourth = read_all(&dir);
        assert!(third.iter().zip(&fourth).all(|((_, a), (_, b))| a != b));
    }
}
