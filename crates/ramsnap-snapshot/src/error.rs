//! An operation's error as the coordinator keeps it: structured fields
//! (the gRPC code, the precondition kind and subject, the message), stored
//! as one JSON object in `operations.error` and returned as fields of
//! `Operation`, instead of a "CODE: message" string parsed back by its
//! prefix. Rows written before (that string) still read.
use ramsnap_common::status::code_name;
use serde::{Deserialize, Serialize};
use tonic::Status;
use tonic_types::StatusExt;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationError {
    /// The gRPC code's name: "FAILED_PRECONDITION", "CANCELLED", ...
    pub code: String,
    /// The precondition that failed ("MEMORY_DUMP_CORRUPT"), if that is
    /// what the error is.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub precondition: String,
    /// What it failed on ("vm/<id>", "volume/<id>").
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subject: String,
    pub message: String,
}

impl OperationError {
    pub fn from_status(s: &Status) -> OperationError {
        let (precondition, subject) = s
            .get_error_details()
            .precondition_failure()
            .and_then(|p| {
                p.violations
                    .first()
                    .map(|v| (v.r#type.clone(), v.subject.clone()))
            })
            .unwrap_or_default();
        OperationError {
            code: code_name(s.code()).to_string(),
            precondition,
            subject,
            message: s.message().to_string(),
        }
    }

    /// The column's text.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("strings serialize")
    }

    /// Reads the column: the JSON object, or the "CODE: message" text of
    /// rows written by earlier releases.
    pub fn decode(column: &str) -> OperationError {
        if let Ok(e) = serde_json::from_str::<OperationError>(column) {
            return e;
        }
        let upper = |c: &str| !c.is_empty() && c.chars().all(|ch| ch.is_ascii_uppercase() || ch == '_');
        match column.split_once(": ") {
            Some((code, message)) if upper(code) => OperationError {
                code: code.into(),
                precondition: String::new(),
                subject: String::new(),
                message: message.into(),
            },
            _ => OperationError {
                code: "UNKNOWN".into(),
                precondition: String::new(),
                subject: String::new(),
                message: column.into(),
            },
        }
    }

    /// `Operation.error_message`: the message, led by the precondition's
    /// kind ("MEMORY_DUMP_CORRUPT: ...") unless it already starts with it,
    /// as operations have always said.
    pub fn display_message(&self) -> String {
        if self.precondition.is_empty() || self.message.starts_with(&self.precondition) {
            self.message.clone()
        } else {
            format!("{}: {}", self.precondition, self.message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rows_of_earlier_releases() {
        let s =
            ramsnap_common::status::failed_precondition("VM_LOCKED", "vm/1", "VM 1 is locked by operation 2");
        let e = OperationError::from_status(&s);
        assert_eq!(e.code, "FAILED_PRECONDITION");
        assert_eq!(
            (e.precondition.as_str(), e.subject.as_str()),
            ("VM_LOCKED", "vm/1")
        );
        assert_eq!(OperationError::decode(&e.encode()), e);
        assert_eq!(e.display_message(), "VM_LOCKED: VM 1 is locked by operation 2");

        let cancelled = OperationError::from_status(&Status::cancelled("cancelled by request"));
        assert_eq!(
            cancelled.encode(),
            r#"{"code":"CANCELLED","message":"cancelled by request"}"#
        );
        assert_eq!(cancelled.display_message(), "cancelled by request");

        // A message with ": " and JSON-looking text survives.
        let odd = OperationError::from_status(&Status::internal(r#"a: b {"code": 1}"#));
        assert_eq!(OperationError::decode(&odd.encode()), odd);

        let legacy = OperationError::decode("FAILED_PRECONDITION: MEMORY_DUMP_CORRUPT: dump x");
        assert_eq!(legacy.code, "FAILED_PRECONDITION");
        assert_eq!(legacy.display_message(), "MEMORY_DUMP_CORRUPT: dump x");
        assert_eq!(OperationError::decode("no code here").code, "UNKNOWN");
    }
}
