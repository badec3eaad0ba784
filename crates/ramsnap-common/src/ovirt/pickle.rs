//! A restricted reader of Python pickles, for the one VDSM 3.3 wrote into a
//! memory snapshot's metadata volume: a dict such as
//! `{'restoreFromSnapshot': True, '_srcDomXML': '<domain ...>',
//! 'elapsedTimeOffset': 12.5}` (vdsm `vm.py`, `vm_conf_for_memory_snapshot`).
//!
//! It knows the opcodes that build plain values (None, bools, integers,
//! floats, byte and text strings, lists, tuples, dicts, the memo) in
//! protocols 0 to 4, and nothing else: an opcode that names a global, calls
//! anything or builds an object (GLOBAL, REDUCE, BUILD, INST, OBJ, NEWOBJ,
//! STACK_GLOBAL, PERSID, EXT...) is refused by name before anything of it is
//! used. Input size, nesting and the values built (memo copies included)
//! are bounded, so no pickle makes it run long or grow large.
use std::collections::HashMap;

/// The most a pickle may hold (the 3.3 metadata volume is 10 KiB).
pub const MAX_BYTES: usize = 1 << 20;
/// The most values it may build, copies from the memo included.
const MAX_NODES: usize = 100_000;
/// The deepest nesting of containers.
const MAX_DEPTH: usize = 32;

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// A Python 2 `str` (bytes).
    Bytes(Vec<u8>),
    Text(String),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    Dict(Vec<(Value, Value)>),
}

impl Value {
    /// A dict's value under a string key (bytes or text).
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// A string's text (a byte string read as UTF-8).
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Text(s) => Some(s),
            Value::Bytes(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    fn nodes(&self) -> usize {
        match self {
            Value::List(v) | Value::Tuple(v) => 1 + v.iter().map(Value::nodes).sum::<usize>(),
            Value::Dict(v) => 1 + v.iter().map(|(k, x)| k.nodes() + x.nodes()).sum::<usize>(),
            _ => 1,
        }
    }

    fn depth(&self) -> usize {
        match self {
            Value::List(v) | Value::Tuple(v) => 1 + v.iter().map(Value::depth).max().unwrap_or(0),
            Value::Dict(v) => 1 + v.iter().map(|(k, x)| k.depth().max(x.depth())).max().unwrap_or(0),
            _ => 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PickleError {
    #[error("{0} bytes: more than a memory metadata pickle holds ({MAX_BYTES})")]
    TooLarge(usize),
    #[error("opcode {name} ({code:#04x}) at byte {at} is not read: only plain values (None, bools, numbers, strings, lists, tuples, dicts) are")]
    Refused { name: &'static str, code: u8, at: usize },
    #[error("unknown opcode {code:#04x} at byte {at}")]
    Unknown { code: u8, at: usize },
    #[error("malformed at byte {at}: {reason}")]
    Malformed { at: usize, reason: String },
    #[error("it builds more than {MAX_NODES} values or nests deeper than {MAX_DEPTH}")]
    TooBig,
    #[error("it ends without STOP")]
    Truncated,
}

/// Opcodes that would reach outside plain values, by name.
fn refused(code: u8) -> Option<&'static str> {
    Some(match code {
        b'c' => "GLOBAL",
        b'R' => "REDUCE",
        b'b' => "BUILD",
        b'i' => "INST",
        b'o' => "OBJ",
        0x81 => "NEWOBJ",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        0x96 => "BYTEARRAY8",
        0x90 => "EMPTY_SET",
        0x91 => "ADDITEMS",
        _ => return None,
    })
}

enum Item {
    Mark,
    V(Value),
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
    stack: Vec<Item>,
    memo: HashMap<u64, Value>,
    nodes: usize,
}

impl<'a> Reader<'a> {
    fn malformed<T>(&self, reason: impl Into<String>) -> Result<T, PickleError> {
        Err(PickleError::Malformed {
            at: self.at,
            reason: reason.into(),
        })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let end = self.at.checked_add(n).ok_or(PickleError::Truncated)?;
        let s = self.b.get(self.at..end).ok_or(PickleError::Truncated)?;
        self.at = end;
        Ok(s)
    }

    fn line(&mut self) -> Result<&'a [u8], PickleError> {
        let rest = &self.b[self.at..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or(PickleError::Truncated)?;
        self.at += n + 1;
        Ok(&rest[..n])
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, PickleError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }

    fn u32(&mut self) -> Result<u32, PickleError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, PickleError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    fn push(&mut self, v: Value) -> Result<(), PickleError> {
        self.nodes += v.nodes();
        if self.nodes > MAX_NODES || v.depth() > MAX_DEPTH {
            return Err(PickleError::TooBig);
        }
        self.stack.push(Item::V(v));
        Ok(())
    }

    fn pop(&mut self) -> Result<Value, PickleError> {
        match self.stack.pop() {
            Some(Item::V(v)) => Ok(v),
            Some(Item::Mark) => self.malformed("a mark where a value was expected"),
            None => self.malformed("the stack is empty"),
        }
    }

    /// Everything above the topmost mark, and the mark removed.
    fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        let Some(m) = self.stack.iter().rposition(|i| matches!(i, Item::Mark)) else {
            return self.malformed("no mark");
        };
        let items: Vec<Value> = self
            .stack
            .drain(m + 1..)
            .map(|i| match i {
                Item::V(v) => v,
                Item::Mark => unreachable!("the topmost mark"),
            })
            .collect();
        self.stack.pop();
        Ok(items)
    }

    fn top_mut(&mut self) -> Result<&mut Value, PickleError> {
        match self.stack.last_mut() {
            Some(Item::V(v)) => Ok(v),
            _ => Err(PickleError::Malformed {
                at: self.at,
                reason: "no container on the stack".into(),
            }),
        }
    }

    fn extend(&mut self, items: Vec<Value>) -> Result<(), PickleError> {
        let at = self.at;
        match self.top_mut()? {
            Value::List(l) => l.extend(items),
            _ => {
                return Err(PickleError::Malformed {
                    at,
                    reason: "APPEND to something that is not a list".into(),
                })
            }
        }
        self.check_top()
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<(), PickleError> {
        if !items.len().is_multiple_of(2) {
            return self.malformed("an odd number of dict items");
        }
        let at = self.at;
        let Value::Dict(d) = self.top_mut()? else {
            return Err(PickleError::Malformed {
                at,
                reason: "SETITEM on something that is not a dict".into(),
            });
        };
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            match d.iter_mut().find(|(old, _)| *old == k) {
                Some((_, old)) => *old = v,
                None => d.push((k, v)),
            }
        }
        self.check_top()
    }

    fn check_top(&mut self) -> Result<(), PickleError> {
        if let Some(Item::V(v)) = self.stack.last() {
            if v.depth() > MAX_DEPTH {
                return Err(PickleError::TooBig);
            }
        }
        Ok(())
    }

    fn memo_put(&mut self, key: u64) -> Result<(), PickleError> {
        let v = match self.stack.last() {
            Some(Item::V(v)) => v.clone(),
            _ => return self.malformed("PUT with no value on the stack"),
        };
        if self.memo.len() >= MAX_NODES {
            return Err(PickleError::TooBig);
        }
        self.memo.insert(key, v);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> Result<(), PickleError> {
        let Some(v) = self.memo.get(&key).cloned() else {
            return self.malformed(format!("GET of memo {key}, never put"));
        };
        self.push(v)
    }

    fn decimal<T: std::str::FromStr>(&self, s: &[u8]) -> Result<T, PickleError> {
        std::str::from_utf8(s)
            .ok()
            .and_then(|t| t.trim().trim_end_matches('L').parse().ok())
            .map_or_else(|| self.malformed("not a number"), Ok)
    }
}

/// A Python 2 `repr` of a byte string, as protocol 0's STRING holds it.
fn string_literal(s: &[u8]) -> Option<Vec<u8>> {
    let q = *s.first()?;
    if !(q == b'\'' || q == b'"') || s.len() < 2 || *s.last()? != q {
        return None;
    }
    let s = &s[1..s.len() - 1];
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] != b'\\' {
            out.push(s[i]);
            i += 1;
            continue;
        }
        let c = *s.get(i + 1)?;
        i += 2;
        match c {
            b'\\' | b'\'' | b'"' => out.push(c),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'a' => out.push(7),
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'v' => out.push(11),
            b'x' => {
                let h = std::str::from_utf8(s.get(i..i + 2)?).ok()?;
                out.push(u8::from_str_radix(h, 16).ok()?);
                i += 2;
            }
            b'0'..=b'7' => {
                let mut n = u32::from(c - b'0');
                let mut k = 0;
                while k < 2 && i < s.len() && (b'0'..=b'7').contains(&s[i]) {
                    n = n * 8 + u32::from(s[i] - b'0');
                    i += 1;
                    k += 1;
                }
                out.push(u8::try_from(n).ok()?);
            }
            _ => return None,
        }
    }
    Some(out)
}

/// Protocol 0's UNICODE: raw-unicode-escape (Latin-1 bytes, `\uXXXX` and
/// `\UXXXXXXXX`).
fn raw_unicode_escape(s: &[u8]) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        let n = match (s[i], s.get(i + 1)) {
            (b'\\', Some(b'u')) => 4,
            (b'\\', Some(b'U')) => 8,
            _ => {
                out.push(char::from(s[i]));
                i += 1;
                continue;
            }
        };
        let h = std::str::from_utf8(s.get(i + 2..i + 2 + n)?).ok()?;
        out.push(char::from_u32(u32::from_str_radix(h, 16).ok()?)?);
        i += 2 + n;
    }
    Some(out)
}

/// Reads a pickle of plain values; see the module.
pub fn read(b: &[u8]) -> Result<Value, PickleError> {
    if b.len() > MAX_BYTES {
        return Err(PickleError::TooLarge(b.len()));
    }
    let mut r = Reader {
        b,
        at: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
        nodes: 0,
    };
    loop {
        let at = r.at;
        let code = r.u8().map_err(|_| PickleError::Truncated)?;
        if let Some(name) = refused(code) {
            return Err(PickleError::Refused { name, code, at });
        }
        match code {
            0x80 => {
                let proto = r.u8()?;
                if proto > 5 {
                    return r.malformed(format!("protocol {proto}"));
                }
            }
            0x95 => {
                r.u64()?; // FRAME: its length; the opcodes follow inline
            }
            b'.' => {
                let v = r.pop()?;
                return Ok(v);
            }
            b'(' => r.stack.push(Item::Mark),
            b'0' => {
                r.stack.pop();
            }
            b'2' => {
                let v = match r.stack.last() {
                    Some(Item::V(v)) => v.clone(),
                    _ => return r.malformed("DUP with no value"),
                };
                r.push(v)?;
            }
            b'1' => {
                r.pop_mark()?;
            }
            b'N' => r.push(Value::None)?,
            0x88 => r.push(Value::Bool(true))?,
            0x89 => r.push(Value::Bool(false))?,
            b'I' => {
                let s = r.line()?;
                let v = match s {
                    b"01" => Value::Bool(true),
                    b"00" => Value::Bool(false),
                    _ => Value::Int(r.decimal(s)?),
                };
                r.push(v)?;
            }
            b'L' => {
                let s = r.line()?;
                let v = Value::Int(r.decimal(s)?);
                r.push(v)?;
            }
            b'J' => {
                let v = r.u32()? as i32;
                r.push(Value::Int(i64::from(v)))?;
            }
            b'K' => {
                let v = r.u8()?;
                r.push(Value::Int(i64::from(v)))?;
            }
            b'M' => {
                let v = r.u16()?;
                r.push(Value::Int(i64::from(v)))?;
            }
            0x8a => {
                let n = usize::from(r.u8()?);
                let bytes = r.take(n)?;
                if n > 8 {
                    return r.malformed("an integer over 64 bits");
                }
                let mut buf = if bytes.last().is_some_and(|&x| x & 0x80 != 0) {
                    [0xffu8; 8]
                } else {
                    [0u8; 8]
                };
                buf[..n].copy_from_slice(bytes);
                r.push(Value::Int(i64::from_le_bytes(buf)))?;
            }
            b'F' => {
                let s = r.line()?;
                let v = Value::Float(r.decimal(s)?);
                r.push(v)?;
            }
            b'G' => {
                let v = f64::from_be_bytes(r.take(8)?.try_into().expect("8 bytes"));
                r.push(Value::Float(v))?;
            }
            b'S' => {
                let s = r.line()?;
                let Some(v) = string_literal(s) else {
                    return r.malformed("a STRING that is not a quoted literal");
                };
                r.push(Value::Bytes(v))?;
            }
            b'T' | b'U' | b'B' | b'C' | 0x8e => {
                let n = match code {
                    b'U' | b'C' => usize::from(r.u8()?),
                    0x8e => usize::try_from(r.u64()?).map_err(|_| PickleError::Truncated)?,
                    _ => r.u32()? as usize,
                };
                let v = r.take(n)?.to_vec();
                r.push(Value::Bytes(v))?;
            }
            b'V' => {
                let s = r.line()?;
                let Some(v) = raw_unicode_escape(s) else {
                    return r.malformed("a UNICODE that is not raw-unicode-escape");
                };
                r.push(Value::Text(v))?;
            }
            b'X' | 0x8c | 0x8d => {
                let n = match code {
                    0x8c => usize::from(r.u8()?),
                    0x8d => usize::try_from(r.u64()?).map_err(|_| PickleError::Truncated)?,
                    _ => r.u32()? as usize,
                };
                let bytes = r.take(n)?;
                let Ok(v) = std::str::from_utf8(bytes) else {
                    return r.malformed("a BINUNICODE that is not UTF-8");
                };
                r.push(Value::Text(v.to_string()))?;
            }
            b']' => r.push(Value::List(Vec::new()))?,
            b')' => r.push(Value::Tuple(Vec::new()))?,
            b'}' => r.push(Value::Dict(Vec::new()))?,
            b'l' => {
                let items = r.pop_mark()?;
                r.push(Value::List(items))?;
            }
            b't' => {
                let items = r.pop_mark()?;
                r.push(Value::Tuple(items))?;
            }
            0x85..=0x87 => {
                let n = usize::from(code - 0x84);
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(r.pop()?);
                }
                items.reverse();
                r.push(Value::Tuple(items))?;
            }
            b'd' => {
                let items = r.pop_mark()?;
                r.push(Value::Dict(Vec::new()))?;
                r.set_items(items)?;
            }
            b'a' => {
                let v = r.pop()?;
                r.extend(vec![v])?;
            }
            b'e' => {
                let items = r.pop_mark()?;
                r.extend(items)?;
            }
            b's' => {
                let v = r.pop()?;
                let k = r.pop()?;
                r.set_items(vec![k, v])?;
            }
            b'u' => {
                let items = r.pop_mark()?;
                r.set_items(items)?;
            }
            b'p' => {
                let s = r.line()?;
                let k = r.decimal(s)?;
                r.memo_put(k)?;
            }
            b'q' => {
                let k = u64::from(r.u8()?);
                r.memo_put(k)?;
            }
            b'r' => {
                let k = u64::from(r.u32()?);
                r.memo_put(k)?;
            }
            0x94 => {
                let k = r.memo.len() as u64;
                r.memo_put(k)?;
            }
            b'g' => {
                let s = r.line()?;
                let k = r.decimal(s)?;
                r.memo_get(k)?;
            }
            b'h' => {
                let k = u64::from(r.u8()?);
                r.memo_get(k)?;
            }
            b'j' => {
                let k = u64::from(r.u32()?);
                r.memo_get(k)?;
            }
            _ => return Err(PickleError::Unknown { code, at }),
        }
        if r.stack.len() > MAX_NODES {
            return Err(PickleError::TooBig);
        }
    }
}

/// The pickle VDSM 3.3 kept in a memory snapshot's metadata volume, as
/// Python 2's `pickle.dumps` (protocol 0) writes it: a dict of
/// `restoreFromSnapshot` (True), `_srcDomXML` (the domain XML the guest ran
/// with, a byte string) and `elapsedTimeOffset` (0.0).
pub fn write_vdsm_memory(domain_xml: &str) -> Vec<u8> {
    let mut xml = String::with_capacity(domain_xml.len() + 64);
    // Python 2's repr of a byte string, in single quotes.
    for b in domain_xml.bytes() {
        match b {
            b'\\' => xml.push_str("\\\\"),
            b'\'' => xml.push_str("\\'"),
            b'\n' => xml.push_str("\\n"),
            b'\r' => xml.push_str("\\r"),
            b'\t' => xml.push_str("\\t"),
            0x20..=0x7e => xml.push(b as char),
            _ => xml.push_str(&format!("\\x{b:02x}")),
        }
    }
    format!(
        "(dp0\nS'restoreFromSnapshot'\np1\nI01\nsS'_srcDomXML'\np2\nS'{xml}'\np3\nsS'elapsedTimeOffset'\np4\nF0.0\ns."
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = "<domain type='kvm'>\n  <name>vm1</name>\n</domain>";

    fn check(v: &Value) {
        assert_eq!(v.get("restoreFromSnapshot"), Some(&Value::Bool(true)));
        assert_eq!(v.get("_srcDomXML").and_then(Value::as_str), Some(XML));
        assert_eq!(v.get("elapsedTimeOffset"), Some(&Value::Float(12.5)));
    }

    /// What Python 2's pickle.dump (protocol 0, VDSM 3.3) writes for the
    /// dict: byte strings as their repr.
    #[test]
    fn reads_python2_protocol_0() {
        let p = b"(dp0\nS'restoreFromSnapshot'\np1\nI01\nsS'_srcDomXML'\np2\nS\"<domain type='kvm'>\\n  <name>vm1</name>\\n</domain>\"\np3\nsS'elapsedTimeOffset'\np4\nF12.5\ns.";
        check(&read(p).unwrap());
    }

    /// Python 3's pickle.dumps of the same dict, protocols 0 and 2.
    #[test]
    fn reads_python3_protocols_0_and_2() {
        let p0 = b"(dp0\nVrestoreFromSnapshot\np1\nI01\nsV_srcDomXML\np2\nV<domain type='kvm'>\\u000a  <name>vm1</name>\\u000a</domain>\np3\nsVelapsedTimeOffset\np4\nF12.5\ns.";
        check(&read(p0).unwrap());
        let p2 = b"\x80\x02}q\x00(X\x13\x00\x00\x00restoreFromSnapshotq\x01\x88X\n\x00\x00\x00_srcDomXMLq\x02X0\x00\x00\x00<domain type='kvm'>\n  <name>vm1</name>\n</domain>q\x03X\x11\x00\x00\x00elapsedTimeOffsetq\x04G@)\x00\x00\x00\x00\x00\x00u.";
        check(&read(p2).unwrap());
    }

    /// pickle.dumps({'a': X()}) where X reduces to os.system('true'): the
    /// GLOBAL is refused before anything is looked up.
    #[test]
    fn refuses_globals_and_calls() {
        let evil = b"(dp0\nVa\np1\ncposix\nsystem\np2\n(Vtrue\np3\ntp4\nRp5\ns.";
        assert!(matches!(
            read(evil),
            Err(PickleError::Refused {
                name: "GLOBAL",
                at: 11,
                ..
            })
        ));
        assert!(matches!(
            read(b"\x80\x04\x93."),
            Err(PickleError::Refused {
                name: "STACK_GLOBAL",
                ..
            })
        ));
        assert!(matches!(
            read(b"]R."),
            Err(PickleError::Refused { name: "REDUCE", .. })
        ));
        assert!(matches!(
            read(b"\x80\x02\x81."),
            Err(PickleError::Refused { name: "NEWOBJ", .. })
        ));
        assert!(matches!(
            read(b"\xff."),
            Err(PickleError::Unknown { code: 0xff, .. })
        ));
    }

    #[test]
    fn malformed_and_oversized_pickles_are_refused() {
        assert_eq!(read(b"(dp0\n"), Err(PickleError::Truncated));
        assert!(matches!(read(b"s."), Err(PickleError::Malformed { .. })));
        assert!(matches!(read(b"g7\n."), Err(PickleError::Malformed { .. })));
        assert!(matches!(read(b"S'open\n."), Err(PickleError::Malformed { .. })));
        assert_eq!(
            read(&vec![b'N'; MAX_BYTES + 1]),
            Err(PickleError::TooLarge(MAX_BYTES + 1))
        );
        // Doubling through the memo: bounded, not exponential.
        let mut bomb = b"]q\x00".to_vec();
        for _ in 0..40 {
            bomb.extend_from_slice(b"(h\x00h\x00lq\x00");
        }
        bomb.push(b'.');
        assert_eq!(read(&bomb), Err(PickleError::TooBig));
        // Deep nesting.
        let mut deep = Vec::new();
        for _ in 0..(MAX_DEPTH + 2) {
            deep.extend_from_slice(b"(");
        }
        for _ in 0..(MAX_DEPTH + 2) {
            deep.extend_from_slice(b"l");
        }
        deep.push(b'.');
        assert_eq!(read(&deep), Err(PickleError::TooBig));
    }

    #[test]
    fn vdsms_memory_pickle_reads_back() {
        let xml = "<domain type='kvm'>\n  <name>a\\b \u{e9}</name>\t</domain>";
        let v = read(&write_vdsm_memory(xml)).unwrap();
        assert_eq!(v.get("_srcDomXML").and_then(Value::as_str), Some(xml));
        assert_eq!(v.get("restoreFromSnapshot"), Some(&Value::Bool(true)));
        assert!(matches!(v.get("elapsedTimeOffset"), Some(Value::Float(_))));
    }
}
