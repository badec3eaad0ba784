//! The test guest's console contract (tests/guest/README.md): records that
//! start with `RAMSNAP-`, one per line, lines ending in `\r\n`.
//!
//! A guest destroyed in the middle of a line leaves it unfinished, and the
//! next QEMU run (a boot or a restore) appends to the same line; so every
//! line is split at each `RAMSNAP-` and each piece is parsed on its own, and
//! a piece that does not match its record's exact format is ignored.

/// `RAMSNAP-TICK token=<t> counter=<n>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tick {
    pub token: String,
    pub counter: u64,
}

/// One parsed record, in console order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Boot(String),
    Tick(Tick),
    /// `RAMSNAP-DISK-MISMATCH ...`: the guest saw a disk it did not write.
    DiskMismatch(String),
    /// `RAMSNAP-ERROR ...`: something in the guest's /init failed.
    Error(String),
}

/// The records of a stretch of console output.
#[derive(Debug, Clone, Default)]
pub struct ConsoleLog {
    pub records: Vec<Record>,
}

fn is_token(s: &str) -> bool {
    s.len() == 16
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn parse_piece(piece: &str) -> Option<Record> {
    let piece = piece.trim_end();
    if let Some(rest) = piece.strip_prefix("RAMSNAP-BOOT token=") {
        return is_token(rest).then(|| Record::Boot(rest.to_string()));
    }
    if let Some(rest) = piece.strip_prefix("RAMSNAP-TICK token=") {
        let (token, counter) = rest.split_once(" counter=")?;
        if !is_token(token) || counter.is_empty() || !counter.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        return Some(Record::Tick(Tick {
            token: token.to_string(),
            counter: counter.parse().ok()?,
        }));
    }
    if piece.starts_with("RAMSNAP-DISK-MISMATCH") {
        return Some(Record::DiskMismatch(piece.to_string()));
    }
    if piece.starts_with("RAMSNAP-ERROR") {
        return Some(Record::Error(piece.to_string()));
    }
    None
}

impl ConsoleLog {
    /// Parses complete lines (the caller passes text up to a line end).
    pub fn parse(text: &str) -> ConsoleLog {
        let mut records = Vec::new();
        for line in text.split('\n') {
            let line = line.trim_end_matches('\r');
            let mut starts: Vec<usize> = line.match_indices("RAMSNAP-").map(|(i, _)| i).collect();
            starts.push(line.len());
            for w in starts.windows(2) {
                if let Some(r) = parse_piece(&line[w[0]..w[1]]) {
                    records.push(r);
                }
            }
        }
        ConsoleLog { records }
    }

    pub fn boots(&self) -> Vec<&str> {
        self.records
            .iter()
            .filter_map(|r| match r {
                Record::Boot(t) => Some(t.as_str()),
                _ => None,
            })
            .collect()
    }

    pub fn ticks(&self) -> Vec<&Tick> {
        self.records
            .iter()
            .filter_map(|r| match r {
                Record::Tick(t) => Some(t),
                _ => None,
            })
            .collect()
    }

    pub fn last_tick(&self) -> Option<&Tick> {
        self.ticks().last().copied()
    }

    /// DISK-MISMATCH and ERROR records: a healthy guest prints none.
    pub fn problems(&self) -> Vec<&str> {
        self.records
            .iter()
            .filter_map(|r| match r {
                Record::DiskMismatch(s) | Record::Error(s) => Some(s.as_str()),
                _ => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_records_and_torn_lines() {
        let text = "noise\r\nRAMSNAP-BOOT token=0123456789abcdef\r\n\
                    RAMSNAP-TICK token=0123456789abcdef counter=1\r\n\
                    RAMSNAP-TICK token=0123456789abcdef couRAMSNAP-TICK token=0123456789abcdef counter=17\r\n\
                    RAMSNAP-TICK token=0123456789ABCDEF counter=2\r\n\
                    RAMSNAP-DISK-MISMATCH counter=3 expected=\"a|b\" found=\"|\"\r\n";
        let log = ConsoleLog::parse(text);
        assert_eq!(log.boots(), vec!["0123456789abcdef"]);
        let counters: Vec<u64> = log.ticks().iter().map(|t| t.counter).collect();
        assert_eq!(counters, vec![1, 17]);
        assert_eq!(log.problems().len(), 1);
    }
}
