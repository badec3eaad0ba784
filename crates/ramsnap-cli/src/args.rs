//! Parsers for what operators type: sizes (`10G`, `512M`, bytes), volume
//! refs (`DOMAIN/IMAGE/VOLUME`) and disks (`DOMAIN:SIZE`); and the
//! `--request-id` flag of the calls that change state. The parsers run
//! inside clap, so malformed input is a usage error (exit 2) that never
//! reaches a service.
use clap::Args;
use ramsnap_proto::common::v1 as common;
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

/// `--request-id`, on every call that changes state.
#[derive(Args, Debug, Clone, Copy)]
pub struct RequestArg {
    /// Makes the call idempotent: a retry with the same id returns the first
    /// call's result. Generated when not given.
    #[arg(long, value_name = "UUID")]
    request_id: Option<Uuid>,
}

impl RequestArg {
    pub fn id(&self) -> Uuid {
        self.request_id.unwrap_or_else(Uuid::new_v4)
    }
}

/// Parses a size in bytes: a number with an optional binary unit
/// (`K`, `M`, `G`, `T`, `P`, also spelled `KiB`, `KB`, `Ki`; any case),
/// e.g. `10G`, `512M`, `1.5G`, `4096`. Units are powers of 1024, as oVirt
/// and qemu-img count them.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = (&s[..split], s[split..].trim_start());
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "ki" | "kib" => 10,
        "m" | "mb" | "mi" | "mib" => 20,
        "g" | "gb" | "gi" | "gib" => 30,
        "t" | "tb" | "ti" | "tib" => 40,
        "p" | "pb" | "pi" | "pib" => 50,
        _ => {
            return Err(format!(
                "unknown unit {unit:?}; use a number of bytes or K, M, G, T, P"
            ))
        }
    };
    let multiplier: u64 = 1 << shift;
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return Err("expected a number, e.g. 10G, 512M or 4096".into());
    }
    if fraction.contains('.') || fraction.len() > 9 {
        return Err(format!("{number:?} is not a number"));
    }
    let too_big = || format!("{text:?} is too large");
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| too_big())?
    };
    let mut bytes = whole.checked_mul(multiplier).ok_or_else(too_big)?;
    if !fraction.is_empty() {
        // Exact integer arithmetic: 1.5G is 1610612736 bytes, 1.3 is not a size.
        let scale = 10u128.pow(fraction.len() as u32);
        let part = u128::from(fraction.parse::<u64>().map_err(|_| too_big())?) * u128::from(multiplier);
        if part % scale != 0 {
            return Err(format!("{text:?} is not a whole number of bytes"));
        }
        let part = u64::try_from(part / scale).map_err(|_| too_big())?;
        bytes = bytes.checked_add(part).ok_or_else(too_big)?;
    }
    Ok(bytes)
}

/// One volume, as the services print it: `DOMAIN/IMAGE/VOLUME`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VolumeRef {
    pub domain: Uuid,
    pub image: Uuid,
    pub volume: Uuid,
}

impl FromStr for VolumeRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        let [domain, image, volume] = parts.as_slice() else {
            return Err(format!(
                "expected DOMAIN/IMAGE/VOLUME (three UUIDs separated by '/'), got {} part(s)",
                parts.len()
            ));
        };
        let id = |what: &str, text: &str| {
            Uuid::parse_str(text).map_err(|_| format!("{what} id {text:?} is not a UUID"))
        };
        Ok(VolumeRef {
            domain: id("domain", domain)?,
            image: id("image", image)?,
            volume: id("volume", volume)?,
        })
    }
}

impl fmt::Display for VolumeRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.domain, self.image, self.volume)
    }
}

impl From<VolumeRef> for common::VolumeRef {
    fn from(r: VolumeRef) -> Self {
        common::VolumeRef {
            domain_id: r.domain.to_string(),
            image_id: r.image.to_string(),
            volume_id: r.volume.to_string(),
        }
    }
}

/// One disk of a new VM: `DOMAIN:SIZE`, the storage domain (its name or
/// id) and the disk's virtual size as [`parse_size`] reads it
/// (`local-file:10G`, `3f2a...:10G`). Domain names have no `:`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    pub domain: crate::names::Ref,
    pub size: u64,
}

impl FromStr for DiskSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((domain, size)) = s.split_once(':') else {
            return Err(
                "expected DOMAIN:SIZE (a storage domain's name or id and a size, e.g. local-file:10G)".into(),
            );
        };
        let domain = domain.parse().map_err(|e| format!("domain: {e}"))?;
        let size = parse_size(size).map_err(|e| format!("disk size: {e}"))?;
        Ok(DiskSpec { domain, size })
    }
}

/// Formats a proto ref the way [`VolumeRef`] parses it.
pub fn ref_text(r: &common::VolumeRef) -> String {
    format!("{}/{}/{}", r.domain_id, r.image_id, r.volume_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_with_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("10g"), Ok(10 << 30));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("10 GB"), Ok(10 << 30));
        assert_eq!(parse_size("1k"), Ok(1024));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("1P"), Ok(1 << 50));
        assert_eq!(parse_size("100b"), Ok(100));
        assert_eq!(parse_size(" 8M "), Ok(8 << 20));
    }

    #[test]
    fn fractional_sizes_must_be_whole_bytes() {
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size(".5K"), Ok(512));
        assert_eq!(parse_size("2.0"), Ok(2));
        assert!(parse_size("1.3").unwrap_err().contains("whole number"));
        assert!(parse_size("0.1K").unwrap_err().contains("whole number"));
    }

    #[test]
    fn malformed_sizes() {
        for bad in ["", "G", "ten", "10X", "10GG", "1.2.3G", "-1", "1e9", "."] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(parse_size("18446744073709551616")
            .unwrap_err()
            .contains("too large"));
        assert!(parse_size("16777216T").unwrap_err().contains("too large"));
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
    }

    #[test]
    fn refs_round_trip() {
        let (d, i, v) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let text = format!("{d}/{i}/{v}");
        let r: VolumeRef = text.parse().unwrap();
        assert_eq!((r.domain, r.image, r.volume), (d, i, v));
        assert_eq!(r.to_string(), text);
        let proto = common::VolumeRef::from(r);
        assert_eq!(proto.image_id, i.to_string());
        assert_eq!(ref_text(&proto), text);
    }

    #[test]
    fn refs_are_normalized_to_lower_case() {
        let (d, i, v) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let upper = format!("{d}/{i}/{v}").to_uppercase();
        let r: VolumeRef = upper.parse().unwrap();
        assert_eq!(r.to_string(), format!("{d}/{i}/{v}"));
    }

    #[test]
    fn malformed_refs() {
        let id = Uuid::new_v4();
        assert!(VolumeRef::from_str(&format!("{id}/{id}"))
            .unwrap_err()
            .contains("DOMAIN/IMAGE/VOLUME"));
        assert!(VolumeRef::from_str(&format!("{id}/{id}/{id}/{id}")).is_err());
        assert!(VolumeRef::from_str(&format!("{id}//{id}"))
            .unwrap_err()
            .contains("image id"));
        assert!(VolumeRef::from_str(&format!("{id}/{id}/nope"))
            .unwrap_err()
            .contains("volume id"));
        assert!(VolumeRef::from_str("").is_err());
    }

    #[test]
    fn disks() {
        use crate::names::Ref;
        let d = Uuid::new_v4();
        assert_eq!(
            format!("{d}:10G").parse::<DiskSpec>(),
            Ok(DiskSpec {
                domain: Ref::Id(d),
                size: 10 << 30
            })
        );
        assert_eq!(
            format!("{}:4096", d.to_string().to_uppercase()).parse::<DiskSpec>(),
            Ok(DiskSpec {
                domain: Ref::Id(d),
                size: 4096
            })
        );
        assert_eq!(
            format!("{d}:1.5G").parse::<DiskSpec>().map(|s| s.size),
            Ok(3 << 29)
        );
        // By name (domain names have no ':').
        assert_eq!(
            "local-file:64M".parse::<DiskSpec>(),
            Ok(DiskSpec {
                domain: Ref::Name("local-file".into()),
                size: 64 << 20
            })
        );
        assert!("nfs:a:1G".parse::<DiskSpec>().is_err());
    }

    #[test]
    fn malformed_disks() {
        let d = Uuid::new_v4();
        assert!(DiskSpec::from_str(&d.to_string())
            .unwrap_err()
            .contains("DOMAIN:SIZE"));
        assert!(DiskSpec::from_str("").unwrap_err().contains("DOMAIN:SIZE"));
        assert!(DiskSpec::from_str(":10G")
            .unwrap_err()
            .starts_with("domain: empty"));
        assert!(DiskSpec::from_str(&format!("{d}:"))
            .unwrap_err()
            .starts_with("disk size: "));
        assert!(DiskSpec::from_str(&format!("{d}:10X"))
            .unwrap_err()
            .contains("unknown unit"));
        assert!(DiskSpec::from_str(&format!("{d}:10G:1")).is_err());
    }

    #[test]
    fn request_ids_are_generated_per_call() {
        let none = RequestArg { request_id: None };
        assert_ne!(none.id(), none.id());
        let id = Uuid::new_v4();
        assert_eq!(RequestArg { request_id: Some(id) }.id(), id);
    }
}
