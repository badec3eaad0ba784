//! What ramsnap reads and writes of oVirt's export storage domain (issue
//! 14; facts in `../shared/reference/ovirt-export-domain.md`): VDSM's
//! `KEY=VALUE` metadata files (the domain's `dom_md/metadata` with its
//! `_SHA_CKSUM`, and each volume's `.meta`), and the Python pickle VDSM 3.3
//! wrote into a memory snapshot's metadata volume, read by a restricted
//! reader that knows a few plain types and nothing else.
pub mod meta;
pub mod pickle;
