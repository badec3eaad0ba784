//! Text that comes from a caller: the one rule every service applies to
//! names and free text, how an error message quotes caller input, and how
//! the CLI prints text that came from a server.
//!
//! **Forbidden characters** (in every name, description, command line and
//! address any service accepts):
//! - the C0 controls (NUL, TAB, LF, CR, ESC, ...), DEL and the C1 controls
//!   (U+0080..U+009F, among them CSI U+009B): they forge log lines and
//!   drive terminals;
//! - the line and paragraph separators U+2028 and U+2029: they break lines
//!   where no newline shows;
//! - the bidirectional formatting characters: the embeddings and overrides
//!   U+202A..U+202E, the isolates U+2066..U+2069, and the marks U+200E,
//!   U+200F and U+061C. They make text print in another order than it is
//!   stored, so that one name can show as another ("Trojan Source",
//!   CVE-2021-42574). Right-to-left text itself (Hebrew, Arabic) is fine.
//!
//! **Echo**: a refusal quotes at most [`ECHO_MAX_CHARS`] characters of
//! what it refuses, escaped. An 8 KB value repeated in a status's message
//! (and again in its details) makes the response's HTTP/2 headers too
//! large, and the client sees a transport error instead of the refusal.
use std::borrow::Cow;

/// The most characters of caller input an error message quotes.
pub const ECHO_MAX_CHARS: usize = 64;

/// Whether `c` may not appear in caller text (see the module's doc).
pub fn forbidden(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2066}'..='\u{2069}'
                | '\u{200E}'
                | '\u{200F}'
                | '\u{061C}'
        )
}

/// The first forbidden character of `value`, described for an error
/// message ("U+001B at character 3"); None when there is none.
pub fn first_forbidden(value: &str) -> Option<String> {
    value
        .chars()
        .enumerate()
        .find(|(_, c)| forbidden(*c))
        .map(|(i, c)| format!("U+{:04X} at character {i}", c as u32))
}

/// Caller input as an error message quotes it: Debug-escaped (so that
/// forbidden characters show as escapes) and, past [`ECHO_MAX_CHARS`]
/// characters, cut with "…".
pub fn echo(value: &str) -> String {
    match value.char_indices().nth(ECHO_MAX_CHARS) {
        None => format!("{value:?}"),
        Some((cut, _)) => format!("{:?}…", &value[..cut]),
    }
}

/// A value the service itself holds (a path, a device name) as a message
/// or an error detail carries it: whole up to [`ECHO_MAX_CHARS`]
/// characters, else cut there and marked with its length.
pub fn clip(value: &str) -> String {
    match value.char_indices().nth(ECHO_MAX_CHARS) {
        None => value.to_string(),
        Some((at, _)) => format!("{}… ({} bytes)", &value[..at], value.len()),
    }
}

/// Text that came from elsewhere, as a terminal may print it: every
/// forbidden character escaped (`\n`, `\r`, `\t`, else `\u{1b}`), the rest
/// as it is.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(forbidden) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if forbidden(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forbidden_set() {
        for ok in ['a', ' ', 'Ü', '漢', 'ש', 'ع', '\u{200B}', '€'] {
            assert!(!forbidden(ok), "{ok:?}");
        }
        for bad in [
            '\0', '\t', '\n', '\r', '\u{1b}', '\u{7f}', '\u{85}', '\u{9b}', '\u{2028}', '\u{2029}',
            '\u{202A}', '\u{202E}', '\u{2066}', '\u{2069}', '\u{200E}', '\u{200F}', '\u{061C}',
        ] {
            assert!(forbidden(bad), "{bad:?}");
        }
        assert_eq!(
            first_forbidden("ab\u{1b}c").as_deref(),
            Some("U+001B at character 2")
        );
        assert_eq!(first_forbidden("שלום עולם"), None);
    }

    #[test]
    fn long_values_are_quoted_cut() {
        assert_eq!(echo("abc"), "\"abc\"");
        assert_eq!(echo("a\u{1b}"), "\"a\\u{1b}\"");
        let long = echo(&"x".repeat(8192));
        assert!(long.len() < 80 && long.ends_with('…'), "{long}");
        assert_eq!(clip("/dev/sda"), "/dev/sda");
        let cut = clip(&"é".repeat(100));
        assert!(
            cut.starts_with(&"é".repeat(64)) && cut.ends_with("… (200 bytes)"),
            "{cut}"
        );
    }

    #[test]
    fn printable_escapes_what_a_terminal_would_obey() {
        assert!(matches!(printable("web-1 Überserver 漢字"), Cow::Borrowed(_)));
        assert_eq!(printable("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(printable("line\nbreak\r\t"), "line\\nbreak\\r\\t");
        assert_eq!(printable("exe.\u{202e}gnp"), "exe.\\u{202e}gnp");
        assert_eq!(printable("\u{200f}"), "\\u{200f}");
    }
}
