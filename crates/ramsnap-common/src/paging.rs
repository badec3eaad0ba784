//! Pages of List calls (Google AIP-158): `page_size`, `page_token`,
//! `next_page_token`.
//!
//! Every paged list has a total order by a key (an id, a name, or a creation
//! time with an id), and a page is the items whose key comes after the
//! previous page's last key. That is keyset paging: an item present from
//! the first page to the last is listed exactly once, whatever is created
//! or removed meanwhile (a new item shows up or not, depending on where its
//! key falls). The token is opaque to clients: the last key and a
//! fingerprint of the request's filters, so that a token is refused with
//! another filter (INVALID_ARGUMENT on `page_token`) rather than answering
//! for one set of filters with the keys of another.
use crate::status::invalid_argument;
use tonic::Status;

/// A page's size when the request gives none (0).
pub const DEFAULT_PAGE_SIZE: usize = 500;
/// The largest page; a larger `page_size` is taken as this one (AIP-158).
/// 1,000 of the largest items (a VM with its disks) stay far below gRPC's
/// 4 MiB default message limit.
pub const MAX_PAGE_SIZE: usize = 1000;

const TOKEN_VERSION: &str = "p1";

/// What a List request asks for: how many, and after which key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageRequest {
    pub size: usize,
    /// The last key of the previous page; None for the first page.
    pub after: Option<String>,
    fingerprint: u64,
}

impl PageRequest {
    /// Reads `page_size` and `page_token`. `filters` are the request's
    /// other parameters that select the items (a VM id, a state...): a token
    /// is only taken back with the same ones.
    pub fn parse(page_size: i32, page_token: &str, filters: &[&str]) -> Result<PageRequest, Status> {
        let size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n < 0 => return Err(invalid_argument("page_size", "must not be negative")),
            n => (n as usize).min(MAX_PAGE_SIZE),
        };
        let fingerprint = fingerprint(filters);
        let after = if page_token.is_empty() {
            None
        } else {
            Some(decode(page_token, fingerprint)?)
        };
        Ok(PageRequest {
            size,
            after,
            fingerprint,
        })
    }

    /// Whether an item with `key` belongs after the previous page.
    pub fn admits(&self, key: &str) -> bool {
        self.after.as_deref().is_none_or(|after| key > after)
    }

    /// The page of `items` (any order) after the previous one, in key
    /// order, and the token of the next page ("" when this is the last).
    pub fn page<T>(&self, items: Vec<T>, key: impl Fn(&T) -> String) -> (Vec<T>, String) {
        self.page_within(items, key, |_| 0, usize::MAX)
    }

    /// Like [`page`](Self::page), and the page also ends before the
    /// `size_of` its items passes `budget` (a page holds one item at least,
    /// whatever its size).
    pub fn page_within<T>(
        &self,
        items: Vec<T>,
        key: impl Fn(&T) -> String,
        size_of: impl Fn(&T) -> usize,
        budget: usize,
    ) -> (Vec<T>, String) {
        let mut keyed: Vec<(String, T)> = items
            .into_iter()
            .map(|t| (key(&t), t))
            .filter(|(k, _)| self.admits(k))
            .collect();
        keyed.sort_by(|a, b| a.0.cmp(&b.0));
        let mut used = 0;
        let fits = keyed
            .iter()
            .take(self.size)
            .take_while(|(_, t)| {
                used += size_of(t);
                used <= budget
            })
            .count()
            .max(1);
        if fits < self.size.min(keyed.len()) {
            // Cut here: the rest is the next page's.
            keyed.truncate(fits + 1);
            let narrower = PageRequest {
                size: fits,
                ..self.clone()
            };
            return narrower.cut(keyed);
        }
        self.cut(keyed)
    }

    /// Like [`page`](Self::page), for items already in key order and
    /// already after the previous page (a keyset query that fetched up to
    /// `size + 1` rows): keeps `size` and says whether more follow.
    pub fn cut<T>(&self, keyed: Vec<(String, T)>) -> (Vec<T>, String) {
        let more = keyed.len() > self.size;
        let mut page: Vec<(String, T)> = keyed;
        page.truncate(self.size);
        let next = match (more, page.last()) {
            (true, Some((k, _))) => self.token_after(k),
            _ => String::new(),
        };
        (page.into_iter().map(|(_, t)| t).collect(), next)
    }

    /// How many rows a keyset query fetches: one more than the page, to
    /// know whether another page follows.
    pub fn fetch_limit(&self) -> i64 {
        self.size as i64 + 1
    }

    fn token_after(&self, key: &str) -> String {
        format!(
            "{TOKEN_VERSION}.{:016x}.{}",
            self.fingerprint,
            hex(key.as_bytes())
        )
    }
}

fn decode(token: &str, fingerprint: u64) -> Result<String, Status> {
    let bad = || invalid_argument("page_token", "is not a token this list returned");
    let mut parts = token.splitn(3, '.');
    let (Some(TOKEN_VERSION), Some(fp), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    let fp = u64::from_str_radix(fp, 16).map_err(|_| bad())?;
    if fp != fingerprint {
        return Err(invalid_argument(
            "page_token",
            "was returned for other filters: give the same filters as the first page's request",
        ));
    }
    let bytes = unhex(key).ok_or_else(bad)?;
    String::from_utf8(bytes).map_err(|_| bad())
}

/// FNV-1a over the filters, separated: stable across builds and restarts.
fn fingerprint(filters: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for f in filters {
        for b in f.bytes().chain(std::iter::once(0xff)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || text.len() > 4096 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A key of (creation time, id) that sorts as the pair does: the time in
/// fixed width (times before 1970 are not made here).
pub fn time_key(unix_ms: i64, id: &str) -> String {
    format!("{:020}/{id}", unix_ms.max(0))
}

/// The (time, id) of a [`time_key`], for a keyset query.
pub fn parse_time_key(key: &str) -> Result<(i64, String), Status> {
    let bad = || invalid_argument("page_token", "is not a token this list returned");
    let (t, id) = key.split_once('/').ok_or_else(bad)?;
    Ok((t.parse().map_err(|_| bad())?, id.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(PageRequest::parse(0, "", &[]).unwrap().size, DEFAULT_PAGE_SIZE);
        assert_eq!(PageRequest::parse(7, "", &[]).unwrap().size, 7);
        assert_eq!(PageRequest::parse(i32::MAX, "", &[]).unwrap().size, MAX_PAGE_SIZE);
        let e = PageRequest::parse(-1, "", &[]).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("page_size"), "{}", e.message());
    }

    #[test]
    fn pages_cover_everything_once_while_items_come_and_go() {
        let mut items: Vec<u32> = (0..1000).step_by(2).collect();
        let key = |n: &u32| format!("{n:06}");
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let req = PageRequest::parse(33, &token, &["vm-1"]).unwrap();
            let (page, next) = req.page(items.clone(), key);
            assert!(page.len() <= 33);
            seen.extend(page);
            // Between pages: odd items appear, some even ones stay.
            items.push(seen.len() as u32 * 2 + 1);
            if next.is_empty() {
                break;
            }
            token = next;
        }
        let evens: Vec<u32> = seen.iter().copied().filter(|n| n % 2 == 0).collect();
        assert_eq!(evens, (0..1000).step_by(2).collect::<Vec<u32>>());
        let mut dedup = seen.clone();
        dedup.dedup();
        assert_eq!(dedup.len(), seen.len(), "nothing twice");
    }

    #[test]
    fn a_token_is_refused_with_other_filters_or_when_forged() {
        let req = PageRequest::parse(1, "", &["vm-1", "running"]).unwrap();
        let (_, next) = req.page(vec![1, 2, 3], |n| n.to_string());
        assert!(PageRequest::parse(1, &next, &["vm-1", "running"]).is_ok());
        let e = PageRequest::parse(1, &next, &["vm-2", "running"]).unwrap_err();
        assert!(e.message().contains("other filters"), "{}", e.message());
        // Separated: ("ab","c") is not ("a","bc").
        assert_ne!(fingerprint(&["ab", "c"]), fingerprint(&["a", "bc"]));
        for forged in [
            "x",
            "p1.zz.00",
            "p1.0.0",
            "p2.0000000000000000.61",
            &"p1.0.".repeat(2000),
        ] {
            assert_eq!(
                PageRequest::parse(1, forged, &[]).unwrap_err().code(),
                tonic::Code::InvalidArgument,
                "{forged}"
            );
        }
    }

    #[test]
    fn a_page_ends_before_its_byte_budget() {
        let req = PageRequest::parse(10, "", &[]).unwrap();
        let items: Vec<usize> = vec![40, 40, 40, 40];
        let key = |n: &usize| format!("{n}");
        // Keys tie here; distinct keys below.
        let items: Vec<(usize, usize)> = items.into_iter().enumerate().collect();
        let (page, next) = req.page_within(items.clone(), |(i, _)| key(i), |(_, b)| *b, 100);
        assert_eq!(page.len(), 2);
        let req2 = PageRequest::parse(10, &next, &[]).unwrap();
        let (rest, last) = req2.page_within(items.clone(), |(i, _)| key(i), |(_, b)| *b, 100);
        assert_eq!(rest.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [2, 3]);
        assert!(last.is_empty());
        // One item bigger than the budget still makes a page.
        let (one, next) = req.page_within(vec![(0, 500), (1, 1)], |(i, _)| key(i), |(_, b)| *b, 100);
        assert_eq!(one.len(), 1);
        assert!(!next.is_empty());
    }

    #[test]
    fn time_keys_sort_as_times() {
        let a = time_key(999, "b");
        let b = time_key(1000, "a");
        assert!(a < b);
        assert_eq!(parse_time_key(&b).unwrap(), (1000, "a".to_string()));
    }
}
