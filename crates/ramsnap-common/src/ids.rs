//! Ids on the wire are canonical hyphenated UUIDs. Parsing them strictly is
//! also what keeps caller input out of file and LVM names.
use crate::status;
use crate::text::echo;
use tonic::Status;
use uuid::Uuid;

/// Parses a required UUID field, naming the field in the error.
pub fn parse(field: &str, value: &str) -> Result<Uuid, Status> {
    if value.is_empty() {
        return Err(status::invalid_argument(field, "is required"));
    }
    parse_strict(value).ok_or_else(|| {
        status::invalid_argument(
            field,
            format!("{} is not a UUID in canonical hyphenated form", echo(value)),
        )
    })
}

/// Parses an optional UUID field: empty means "not given".
pub fn parse_optional(field: &str, value: &str) -> Result<Option<Uuid>, Status> {
    if value.is_empty() {
        Ok(None)
    } else {
        parse(field, value).map(Some)
    }
}

fn parse_strict(value: &str) -> Option<Uuid> {
    // Uuid::parse_str also takes braced, URN and simple forms; only the
    // hyphenated form is accepted so that every id has one spelling.
    if value.len() != 36 {
        return None;
    }
    let id = Uuid::parse_str(value).ok()?;
    (id.hyphenated().to_string() == value.to_ascii_lowercase()).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_hyphenated_uuids() {
        let id = Uuid::new_v4();
        assert_eq!(parse("x", &id.to_string()).unwrap(), id);
        assert!(parse("x", &id.simple().to_string()).is_err());
        assert!(parse("x", "../../etc/passwd").is_err());
        assert!(parse("x", "").is_err());
        assert_eq!(parse_optional("x", "").unwrap(), None);
        let err = parse("volume_id", "nope").unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("volume_id"));
    }

    #[test]
    fn long_values_are_echoed_cut() {
        let err = parse("vm_id", &"x".repeat(8192)).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().len() < 200, "{}", err.message());
        assert!(err.message().contains(&format!("\"{}\"…", "x".repeat(64))));
        assert_eq!(echo("ab"), "\"ab\"");
        assert_eq!(echo("a\u{1b}b"), "\"a\\u{1b}b\"");
        let multibyte = "é".repeat(100);
        assert_eq!(echo(&multibyte), format!("{:?}…", "é".repeat(64)));
    }
}
