//! Figures read back from the services' logs (benchmarks): the last value
//! a line logged, each saga node's time.
use std::collections::BTreeMap;

/// The last `key=<number>` on a log line containing `needle`.
pub fn last_logged(logs: &str, needle: &str, key: &str) -> Option<f64> {
    let line = logs.lines().rev().find(|l| l.contains(needle))?;
    let clean: String = strip_ansi(line);
    let at = clean.find(&format!("{key}="))? + key.len() + 1;
    clean[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

pub fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Per saga node: the last time logged ("saga node done ... node=N ms=M").
pub fn node_times(logs: &str, saga: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in logs.lines().map(strip_ansi) {
        if !line.contains("saga node done") || !line.contains(&format!("saga_name=\"{saga}\"")) {
            continue;
        }
        let node = line
            .split("node=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("?")
            .to_string();
        if let Some(ms) = last_logged(&line, "saga node done", "ms") {
            out.insert(node, ms);
        }
    }
    out
}
