//! The coordinator's error as it keeps it: structured fields (the gRPC
//! code, the precondition kind and subject, the message). One type for the
//! two places an error outlives the call that made it:
//! - the saga log, where a failed node's error is kept so that the
//!   operation still names it after a restart (`saga_node_events.data`);
//! - the operation (`operations.error`), returned as fields of `Operation`.
//!
//! Both store it as the same JSON object; [`Error::decode`] also reads
//! what earlier releases wrote (a "CODE: message" string in operations, a
//! numeric code with a nested precondition in the saga log). It converts
//! from a [`Status`] and back in one place each ([`From`] both ways), the
//! precondition surviving as google.rpc PreconditionFailure details.
use ramsnap_common::status::code_name;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tonic::{Code, Status};
use tonic_types::StatusExt;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Error {
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

impl Error {
    pub fn from_status(s: &Status) -> Error {
        let (precondition, subject) = s
            .get_error_details()
            .precondition_failure()
            .and_then(|p| {
                p.violations
                    .first()
                    .map(|v| (v.r#type.clone(), v.subject.clone()))
            })
            .unwrap_or_default();
        Error {
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

    /// The saga log's form (the same object as [`Error::encode`]'s).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("strings serialize")
    }

    /// Reads a saga log's failed-node data: [`Error::to_json`]'s object, or
    /// what earlier releases wrote (`{"code": <number>, "message": ...,
    /// "precondition": {"type": ..., "subject": ...}}`).
    pub fn from_json(v: Value) -> Error {
        if let Ok(e) = serde_json::from_value::<Error>(v.clone()) {
            return e;
        }
        let code = v
            .get("code")
            .and_then(|c| c.as_i64())
            .unwrap_or(Code::Unknown as i64) as i32;
        let p = &v["precondition"];
        Error {
            code: code_name(Code::from_i32(code)).to_string(),
            precondition: p["type"].as_str().unwrap_or_default().to_string(),
            subject: p["subject"].as_str().unwrap_or_default().to_string(),
            message: v["message"].as_str().unwrap_or_default().to_string(),
        }
    }

    /// The gRPC code.
    pub fn code(&self) -> Code {
        code_from_name(&self.code)
    }

    /// Reads the column: the JSON object, or the "CODE: message" text of
    /// rows written by earlier releases.
    pub fn decode(column: &str) -> Error {
        if let Ok(e) = serde_json::from_str::<Error>(column) {
            return e;
        }
        let upper = |c: &str| !c.is_empty() && c.chars().all(|ch| ch.is_ascii_uppercase() || ch == '_');
        match column.split_once(": ") {
            Some((code, message)) if upper(code) => Error {
                code: code.into(),
                precondition: String::new(),
                subject: String::new(),
                message: message.into(),
            },
            _ => Error {
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

impl From<&Status> for Error {
    fn from(s: &Status) -> Error {
        Error::from_status(s)
    }
}

impl From<Error> for Status {
    /// The status the error was made from, as far as it was kept: the code,
    /// the message, and a failed precondition's kind and subject.
    fn from(e: Error) -> Status {
        if e.precondition.is_empty() {
            Status::new(e.code(), e.message)
        } else {
            Status::with_error_details(
                e.code(),
                e.message.clone(),
                tonic_types::ErrorDetails::with_precondition_failure_violation(
                    e.precondition,
                    e.subject,
                    e.message,
                ),
            )
        }
    }
}

/// A gRPC code from its name (as [`code_name`] spells it); UNKNOWN for any
/// other text.
fn code_from_name(name: &str) -> Code {
    (0..=16)
        .map(Code::from_i32)
        .find(|c| code_name(*c) == name)
        .unwrap_or(Code::Unknown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rows_of_earlier_releases() {
        let s =
            ramsnap_common::status::failed_precondition("VM_LOCKED", "vm/1", "VM 1 is locked by operation 2");
        let e = Error::from_status(&s);
        assert_eq!(e.code, "FAILED_PRECONDITION");
        assert_eq!(
            (e.precondition.as_str(), e.subject.as_str()),
            ("VM_LOCKED", "vm/1")
        );
        assert_eq!(Error::decode(&e.encode()), e);
        assert_eq!(e.display_message(), "VM_LOCKED: VM 1 is locked by operation 2");

        let cancelled = Error::from_status(&Status::cancelled("cancelled by request"));
        assert_eq!(
            cancelled.encode(),
            r#"{"code":"CANCELLED","message":"cancelled by request"}"#
        );
        assert_eq!(cancelled.display_message(), "cancelled by request");

        // A message with ": " and JSON-looking text survives.
        let odd = Error::from_status(&Status::internal(r#"a: b {"code": 1}"#));
        assert_eq!(Error::decode(&odd.encode()), odd);

        let legacy = Error::decode("FAILED_PRECONDITION: MEMORY_DUMP_CORRUPT: dump x");
        assert_eq!(legacy.code, "FAILED_PRECONDITION");
        assert_eq!(legacy.display_message(), "MEMORY_DUMP_CORRUPT: dump x");
        assert_eq!(Error::decode("no code here").code, "UNKNOWN");
    }

    #[test]
    fn status_round_trip_and_saga_logs_of_earlier_releases() {
        let s = ramsnap_common::status::failed_precondition("VOLUME_IN_USE", "volume/9", "in use by vm 3");
        let back = Status::from(Error::from(&s));
        assert_eq!(back.code(), Code::FailedPrecondition);
        assert_eq!(back.message(), "in use by vm 3");
        let details = back.get_error_details();
        let v = &details.precondition_failure().unwrap().violations[0];
        assert_eq!(
            (v.r#type.as_str(), v.subject.as_str()),
            ("VOLUME_IN_USE", "volume/9")
        );
        for code in (0..=16).map(Code::from_i32) {
            assert_eq!(Status::from(Error::from(&Status::new(code, "m"))).code(), code);
        }
        let e = Error::from(&s);
        assert_eq!(Error::from_json(e.to_json()), e);
        // The saga log's form before this type.
        let old = serde_json::json!({
            "code": Code::FailedPrecondition as i32,
            "message": "in use by vm 3",
            "precondition": {"type": "VOLUME_IN_USE", "subject": "volume/9"},
        });
        assert_eq!(Error::from_json(old), e);
        let old = serde_json::json!({"code": Code::Cancelled as i32, "message": "cancelled by request"});
        assert_eq!(Error::from_json(old).code(), Code::Cancelled);
    }
}
