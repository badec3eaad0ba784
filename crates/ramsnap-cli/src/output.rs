//! How results are printed: aligned tables and `key: value` lists for
//! people, pretty JSON for scripts. Everything goes to stdout; progress and
//! errors go to stderr so that `-o json | jq` always sees clean JSON.
use serde_json::Value;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

/// Text that came from a server (names, descriptions, error messages and
/// details, warnings, paths) as it is printed for people: every character
/// that `ramsnap_common::text` forbids in caller text (controls, line
/// separators, bidi formatting) escaped (`\n`, `\r`, `\t`, else `\u{1b}`),
/// so that nothing a server returns can move the cursor, clear the screen,
/// recolour the terminal or make one name look like another. Every table
/// cell, field value, warning, summary and error line goes through it; JSON
/// output does not need it (serde_json escapes control characters, and a
/// script reads the text as it is).
pub use ramsnap_common::text::printable;

/// A table with a header row; columns are as wide as their widest cell.
pub struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&'static str]) -> Table {
        Table {
            header: header.to_vec(),
            rows: Vec::new(),
        }
    }

    /// A row; each cell is made [`printable`].
    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.header.len());
        self.rows
            .push(cells.into_iter().map(|c| printable(&c).into_owned()).collect());
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let header = self.header.iter().map(|h| h.to_string()).collect::<Vec<_>>();
        for cells in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                line.push_str(&" ".repeat(w - cell.chars().count()));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    pub fn print(&self) {
        print!("{}", self.render());
    }
}

/// `key: value` lines with the values aligned, for a single resource; the
/// values made [`printable`].
pub fn render_fields(fields: &[(&str, String)]) -> String {
    let width = fields.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    fields
        .iter()
        .map(|(k, v)| format!("{:<width$} {}\n", format!("{k}:"), printable(v)))
        .collect()
}

/// Prints a line for people on stdout, made [`printable`].
pub fn print_line(text: impl std::fmt::Display) {
    println!("{}", printable(&text.to_string()));
}

/// Prints a line for people on stderr, made [`printable`].
pub fn eprint_line(text: impl std::fmt::Display) {
    eprintln!("{}", printable(&text.to_string()));
}

pub fn print_fields(fields: &[(&str, String)]) {
    print!("{}", render_fields(fields));
}

pub fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("a serde_json::Value always serializes")
    );
}

/// An enum's proto name as the word the flags take and JSON prints:
/// `DOMAIN_TYPE_FILE` with prefix `DOMAIN_TYPE_` is `file`,
/// `VOLUME_PURPOSE_MEMORY_DUMP` is `memory-dump`.
pub fn readable(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
        .replace('_', "-")
}

/// Declares `pub fn NAME(value: i32) -> String` for proto enums: the
/// [`readable`] word of a known value, `unknown(N)` otherwise.
macro_rules! labels {
    ($($name:ident: $ty:ty, $prefix:literal;)*) => {
        $(
            pub fn $name(value: i32) -> String {
                match <$ty>::try_from(value) {
                    Ok(v) => $crate::output::readable(v.as_str_name(), $prefix),
                    Err(_) => format!("unknown({value})"),
                }
            }
        )*
    };
}
pub(crate) use labels;

/// `-` for an empty optional value in tables and fields.
pub fn dash_if_empty(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

/// `null` for an empty optional value (an id not set) in JSON.
pub fn non_empty(s: &str) -> Value {
    if s.is_empty() {
        Value::Null
    } else {
        Value::from(s)
    }
}

/// A byte count for people, in powers of 1024 as the size flags take them:
/// `0 B`, `512 MiB`, `1.5 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    let text = format!("{value:.1}");
    let text = text.strip_suffix(".0").unwrap_or(&text);
    format!("{text} {}", UNITS[unit])
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS UTC` (the civil-from-days algorithm
/// of Howard Hinnant's date library), so no time zone database is needed.
pub fn utc_time(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS.mmm UTC`.
pub fn utc_time_ms(ms: i64) -> String {
    let text = utc_time(ms.div_euclid(1000));
    let seconds = text.strip_suffix(" UTC").unwrap_or(&text);
    format!("{seconds}.{:03} UTC", ms.rem_euclid(1000))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1 KiB");
        assert_eq!(human_bytes(512 << 20), "512 MiB");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
        assert_eq!(human_bytes(10 << 30), "10 GiB");
        assert_eq!(human_bytes(u64::MAX), "16 EiB");
    }

    #[test]
    fn table_aligns_columns() {
        let mut t = Table::new(&["ID", "NAME"]);
        t.row(vec!["1".into(), "files".into()]);
        t.row(vec!["12345".into(), "x".into()]);
        assert_eq!(t.render(), "ID     NAME\n1      files\n12345  x\n");
    }

    #[test]
    fn fields_align_values() {
        assert_eq!(
            render_fields(&[("id", "1".into()), ("location", "/x".into())]),
            "id:       1\nlocation: /x\n"
        );
    }

    #[test]
    fn utc_times() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_time(1_700_000_000), "2023-11-14 22:13:20 UTC");
        assert_eq!(utc_time(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc_time(-1), "1969-12-31 23:59:59 UTC");
    }

    #[test]
    fn utc_times_with_milliseconds() {
        assert_eq!(utc_time_ms(1_700_000_000_123), "2023-11-14 22:13:20.123 UTC");
        assert_eq!(utc_time_ms(5), "1970-01-01 00:00:00.005 UTC");
        assert_eq!(utc_time_ms(-1), "1969-12-31 23:59:59.999 UTC");
    }

    #[test]
    fn printable_escapes_what_a_terminal_would_obey() {
        assert!(matches!(printable("web-1 Überserver 漢字"), Cow::Borrowed(_)));
        assert_eq!(printable("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(printable("line\nbreak\r\t"), "line\\nbreak\\r\\t");
        assert_eq!(printable("nul\0"), "nul\\u{0}");
        assert_eq!(printable("c1\u{9b}31m"), "c1\\u{9b}31m");
        assert_eq!(printable("del\u{7f}"), "del\\u{7f}");
        assert_eq!(printable("exe.\u{202e}gnp"), "exe.\\u{202e}gnp");
        assert_eq!(printable("\u{2066}x\u{2069}"), "\\u{2066}x\\u{2069}");
        assert_eq!(printable("\u{200f}"), "\\u{200f}");
        let mut t = Table::new(&["NAME", "X"]);
        t.row(vec!["evil\u{1b}[31m".into(), "\r".into()]);
        let text = t.render();
        assert!(!text.contains('\u{1b}') && !text.contains('\r'), "{text:?}");
        assert_eq!(text, "NAME            X\nevil\\u{1b}[31m  \\r\n");
        let f = render_fields(&[("name", "a\u{202e}b\nc".into())]);
        assert_eq!(f, "name: a\\u{202e}b\\nc\n");
    }

    #[test]
    fn readable_enum_words() {
        assert_eq!(readable("DOMAIN_TYPE_FILE", "DOMAIN_TYPE_"), "file");
        assert_eq!(readable("VM_STATUS_POWERING_UP", "VM_STATUS_"), "powering-up");
        assert_eq!(dash_if_empty(""), "-");
        assert_eq!(non_empty(""), Value::Null);
    }
}
