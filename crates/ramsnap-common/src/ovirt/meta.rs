//! VDSM's metadata files: `KEY=VALUE` lines.
//!
//! - The domain metadata (`dom_md/metadata`, vdsm `persistentDict.py`):
//!   its last key `_SHA_CKSUM` is the SHA-1, in lowercase hex, of the
//!   concatenation, without separators, of `KEY=VALUE` for every other key,
//!   sorted by key, values stripped.
//! - A volume's `.meta` (vdsm `volume.py`, `fileVolume.py`): `KEY=VALUE`
//!   lines, then a line `EOF`; no value contains `=` (the 3.3 parser splits
//!   on every `=`); `SIZE` counts 512-byte sectors.
use sha1::{Digest, Sha1};
use std::collections::BTreeMap;

/// The checksum key of the domain metadata.
pub const CHECKSUM_KEY: &str = "_SHA_CKSUM";
/// The most a metadata file may hold (VDSM's own are well under 4 KiB).
pub const MAX_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    #[error("{0} bytes: more than a metadata file holds ({MAX_BYTES})")]
    TooLarge(usize),
    #[error("not UTF-8 text")]
    NotText,
    #[error("line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error("key {0} appears twice")]
    Repeated(String),
    #[error("no {0} line")]
    Missing(&'static str),
    #[error("checksum mismatch: the file says {recorded}, its keys give {computed}")]
    Checksum { recorded: String, computed: String },
    #[error("{key}: {reason}")]
    Value { key: String, reason: String },
}

/// Parses `KEY=VALUE` lines (blank lines skipped). With `eof`, a line `EOF`
/// must end the keys (a `.meta`); without, none may appear.
pub fn parse(text: &[u8], eof: bool) -> Result<BTreeMap<String, String>, MetaError> {
    if text.len() > MAX_BYTES {
        return Err(MetaError::TooLarge(text.len()));
    }
    // A .meta is padded with NULs to its block on some storage.
    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    let text = std::str::from_utf8(&text[..end]).map_err(|_| MetaError::NotText)?;
    let mut out = BTreeMap::new();
    let mut ended = false;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        let n = i + 1;
        if ended {
            return Err(MetaError::Line {
                line: n,
                reason: "text after EOF".into(),
            });
        }
        if line == "EOF" {
            if !eof {
                return Err(MetaError::Line {
                    line: n,
                    reason: "an EOF line in a file that has none".into(),
                });
            }
            ended = true;
            continue;
        }
        let (key, value) = line.split_once('=').ok_or_else(|| MetaError::Line {
            line: n,
            reason: format!("{line:?} is not KEY=VALUE"),
        })?;
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(MetaError::Line {
                line: n,
                reason: format!("{key:?} is not a key"),
            });
        }
        if eof && value.contains('=') {
            return Err(MetaError::Line {
                line: n,
                reason: format!("the value of {key} contains '=', which VDSM 3.3 cannot read"),
            });
        }
        if out.insert(key.to_string(), value.trim().to_string()).is_some() {
            return Err(MetaError::Repeated(key.to_string()));
        }
    }
    if eof && !ended {
        return Err(MetaError::Missing("EOF"));
    }
    Ok(out)
}

/// The `_SHA_CKSUM` of a domain metadata's other keys.
pub fn checksum(keys: &BTreeMap<String, String>) -> String {
    let mut h = Sha1::new();
    for (k, v) in keys.iter().filter(|(k, _)| k.as_str() != CHECKSUM_KEY) {
        h.update(k.as_bytes());
        h.update(b"=");
        h.update(v.trim().as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a domain metadata file and checks its `_SHA_CKSUM`.
pub fn parse_domain(text: &[u8]) -> Result<BTreeMap<String, String>, MetaError> {
    let keys = parse(text, false)?;
    let recorded = keys.get(CHECKSUM_KEY).ok_or(MetaError::Missing(CHECKSUM_KEY))?;
    let computed = checksum(&keys);
    if !recorded.eq_ignore_ascii_case(&computed) {
        return Err(MetaError::Checksum {
            recorded: recorded.clone(),
            computed,
        });
    }
    Ok(keys)
}

/// A domain metadata file: the keys sorted, then `_SHA_CKSUM`.
pub fn write_domain(keys: &BTreeMap<String, String>) -> Result<String, MetaError> {
    let mut out = String::new();
    for (k, v) in keys.iter().filter(|(k, _)| k.as_str() != CHECKSUM_KEY) {
        check_pair(k, v, false)?;
        out.push_str(&format!("{k}={v}\n"));
    }
    out.push_str(&format!("{CHECKSUM_KEY}={}\n", checksum(keys)));
    Ok(out)
}

/// A `.meta` file: the pairs in the order given, then `EOF`.
pub fn write_volume(pairs: &[(&str, String)]) -> Result<String, MetaError> {
    let mut out = String::new();
    for (k, v) in pairs {
        check_pair(k, v, true)?;
        out.push_str(&format!("{k}={v}\n"));
    }
    out.push_str("EOF\n");
    Ok(out)
}

fn check_pair(k: &str, v: &str, volume: bool) -> Result<(), MetaError> {
    let bad = |reason: &str| {
        Err(MetaError::Value {
            key: k.to_string(),
            reason: reason.to_string(),
        })
    };
    if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return bad("not a key");
    }
    if v.contains('\n') || v.contains('\r') || v.contains('\0') {
        return bad("a line break or NUL in the value");
    }
    if volume && v.contains('=') {
        return bad("'=' in a .meta value (VDSM 3.3 splits on it)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// vdsm's own test vector (tests/storage/filesd_metadata_test.py).
    const VDSM_EXAMPLE: &str = "ALIGNMENT=1048576
BLOCK_SIZE=512
CLASS=Data
DESCRIPTION=storage domain
IOOPTIMEOUTSEC=10
LEASERETRIES=3
LEASETIMESEC=60
LOCKPOLICY=
LOCKRENEWALINTERVALSEC=5
POOL_UUID=
REMOTE_PATH=server:/path
ROLE=Regular
SDUUID=275766cb-c7d8-43d6-a663-4e52160de620
TYPE=LOCALFS
VERSION=5
_SHA_CKSUM=9336f77705ff9e3d5faf65c4d0dc818a29de458d
";

    #[test]
    fn the_domain_checksum_is_vdsms() {
        let keys = parse_domain(VDSM_EXAMPLE.as_bytes()).unwrap();
        assert_eq!(keys["CLASS"], "Data");
        assert_eq!(keys["LOCKPOLICY"], "");
        assert_eq!(write_domain(&keys).unwrap(), VDSM_EXAMPLE);
    }

    #[test]
    fn a_changed_domain_metadata_is_refused() {
        let changed = VDSM_EXAMPLE.replace("CLASS=Data", "CLASS=Backup");
        assert!(matches!(
            parse_domain(changed.as_bytes()),
            Err(MetaError::Checksum { .. })
        ));
        let without: String = VDSM_EXAMPLE
            .lines()
            .filter(|l| !l.starts_with("_SHA"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            parse_domain(without.as_bytes()),
            Err(MetaError::Missing(CHECKSUM_KEY))
        );
        let twice = format!("{VDSM_EXAMPLE}CLASS=Data\n");
        assert_eq!(
            parse_domain(twice.as_bytes()),
            Err(MetaError::Repeated("CLASS".into()))
        );
        assert!(matches!(
            parse_domain(b"CLASS\n"),
            Err(MetaError::Line { line: 1, .. })
        ));
        assert_eq!(parse_domain(&[0xff, b'\n']), Err(MetaError::NotText));
        assert_eq!(
            parse_domain(&vec![b'A'; MAX_BYTES + 1]),
            Err(MetaError::TooLarge(MAX_BYTES + 1))
        );
    }

    #[test]
    fn a_volume_meta_ends_with_eof() {
        let text = write_volume(&[
            ("DOMAIN", "275766cb-c7d8-43d6-a663-4e52160de620".into()),
            ("PUUID", "00000000-0000-0000-0000-000000000000".into()),
            ("SIZE", "2097152".into()),
            ("DESCRIPTION", "".into()),
        ])
        .unwrap();
        assert!(text.ends_with("DESCRIPTION=\nEOF\n"), "{text}");
        let keys = parse(text.as_bytes(), true).unwrap();
        assert_eq!(keys["SIZE"], "2097152");
        // Padded with NULs to its block, as on storage.
        let mut padded = text.clone().into_bytes();
        padded.resize(512, 0);
        assert_eq!(parse(&padded, true).unwrap(), keys);
        let cut = text.replace("EOF\n", "");
        assert_eq!(parse(cut.as_bytes(), true), Err(MetaError::Missing("EOF")));
        let after = format!("{text}SIZE=1\n");
        assert!(matches!(
            parse(after.as_bytes(), true),
            Err(MetaError::Line { .. })
        ));
        assert!(write_volume(&[("DESCRIPTION", "a=b".into())]).is_err());
        assert!(write_volume(&[("DESCRIPTION", "a\nEOF".into())]).is_err());
        assert!(matches!(
            parse(b"DESCRIPTION=a=b\nEOF\n", true),
            Err(MetaError::Line { line: 1, .. })
        ));
    }
}
