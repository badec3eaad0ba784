//! Every bound the service puts on what a caller sends, in one place (the
//! crate README lists them). A caller that breaks one gets INVALID_ARGUMENT
//! naming the field; a bad value is never passed on to a tool, so no error
//! about caller input carries a command line or a host path.
use crate::error::{Result, StorageError};
use ramsnap_common::status;
use tonic::Status;
use uuid::Uuid;

/// Volume descriptions, in bytes of UTF-8. The bound is set by BLOCK
/// domains, which keep a description hex-encoded in one LVM tag (LVM takes
/// tags of up to 1024 characters; `RS_DESC_` + 2 × 500 fits), and is the
/// same on FILE so that any volume copies to any domain with its
/// description. VDSM keeps 210 characters in its volume metadata slots;
/// oVirt's own descriptions ("memory of snapshot <id> of VM <name>") fit
/// with a 255-byte VM name.
pub const MAX_DESCRIPTION_BYTES: usize = 500;

/// Domain names: 1 to this many characters of `[A-Za-z0-9_.-]` (they go
/// into an LVM tag and a metadata file).
pub const MAX_DOMAIN_NAME_BYTES: usize = 64;

/// `RegisterDomainRequest.location`: an absolute path (Linux's PATH_MAX).
pub const MAX_LOCATION_BYTES: usize = 4096;

/// Volume capacities are whole 512-byte sectors (what guests address,
/// what qemu rounds any other size to, and LVM's unit), at least one.
pub const SECTOR_BYTES: u64 = 512;

pub use ramsnap_common::text::{clip, echo};

/// Checks a free-text field: at most `max` bytes, no forbidden character
/// (`ramsnap_common::text`: controls, line separators, bidi formatting).
pub fn check_text(field: &'static str, value: &str, max: usize) -> Result<()> {
    if value.len() > max {
        return Err(StorageError::invalid(
            field,
            format!("is {} bytes long; at most {max} bytes are allowed", value.len()),
        ));
    }
    if let Some((at, c)) = value
        .char_indices()
        .find(|(_, c)| ramsnap_common::text::forbidden(*c))
    {
        return Err(StorageError::invalid(
            field,
            format!(
                "holds the character U+{:04X} at byte {at}; control, line-separator and \
                 bidirectional-formatting characters are not allowed",
                c as u32
            ),
        ));
    }
    Ok(())
}

/// A volume description, as every call that records one checks it.
pub fn check_description(field: &'static str, value: &str) -> Result<()> {
    check_text(field, value, MAX_DESCRIPTION_BYTES)
}

/// A volume's capacity: a positive multiple of [`SECTOR_BYTES`].
pub fn check_capacity(field: &'static str, capacity: u64) -> Result<()> {
    if capacity == 0 {
        return Err(StorageError::invalid(field, "must be greater than 0"));
    }
    if !capacity.is_multiple_of(SECTOR_BYTES) {
        return Err(StorageError::invalid(
            field,
            format!("{capacity} is not a multiple of {SECTOR_BYTES} bytes (a disk sector)"),
        ));
    }
    Ok(())
}

/// Parses a required id (a canonical hyphenated UUID) like
/// `ramsnap_common::ids::parse`, whose message repeats the whole value:
/// anything that cannot be an id (not 36 bytes) is refused here first with
/// a cut echo of it.
pub fn parse_id(field: &str, value: &str) -> Result<Uuid, Status> {
    if !value.is_empty() && value.len() != 36 {
        return Err(status::invalid_argument(
            field,
            format!("{} is not a UUID in canonical hyphenated form", echo(value)),
        ));
    }
    ramsnap_common::ids::parse(field, value)
}

/// An optional id: empty means "not given".
pub fn parse_optional_id(field: &str, value: &str) -> Result<Option<Uuid>, Status> {
    if value.is_empty() {
        Ok(None)
    } else {
        parse_id(field, value).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_rules() {
        assert!(check_text("d", "before upgrade, ünïcode, שלום", 500).is_ok());
        for bad in [
            "a\u{1b}[31m",
            "a\rb",
            "a\nb",
            "a\0b",
            "a\u{202E}b",
            "a\u{2066}b",
            "a\u{85}b",
            "a\u{200F}b",
            "a\u{2028}b",
        ] {
            assert!(check_text("d", bad, 500).is_err(), "{bad:?}");
        }
        assert!(check_text("d", &"x".repeat(501), 500).is_err());
        assert!(check_text("d", &"x".repeat(500), 500).is_ok());
    }

    #[test]
    fn capacities() {
        assert!(check_capacity("c", 0).is_err());
        assert!(check_capacity("c", 1).is_err());
        assert!(check_capacity("c", 513).is_err());
        assert!(check_capacity("c", 512).is_ok());
    }

    #[test]
    fn long_ids_are_not_echoed_whole() {
        let long = "x".repeat(8192);
        let err = parse_id("volume_id", &long).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().len() < 200, "{}", err.message());
        let id = Uuid::new_v4();
        assert_eq!(parse_id("v", &id.to_string()).unwrap(), id);
        assert!(parse_id("v", "").is_err());
        assert_eq!(parse_optional_id("v", "").unwrap(), None);
        assert_eq!(echo("abc"), "\"abc\"");
        assert_eq!(clip("/dev/sda"), "/dev/sda");
        assert!(clip(&"é".repeat(100)).starts_with(&"é".repeat(64)));
        assert!(clip(&"é".repeat(100)).ends_with("… (200 bytes)"));
    }
}
