//! Checksums a dump file the way the host agent does and prints the time:
//! `cargo run --release -p ramsnap-common --example digest -- PATH [CAPACITY] [sha256|blake3-4m]`.
use ramsnap_common::checksum::{digest_file, Algorithm};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = std::path::Path::new(args.get(1).expect("a path"));
    let len = std::fs::metadata(path).expect("the file").len();
    let capacity = args.get(2).and_then(|c| c.parse().ok()).unwrap_or(len);
    let algorithm = match args.get(3).map(String::as_str) {
        Some("sha256") => Algorithm::Sha256,
        _ => Algorithm::Blake3Chunks,
    };
    let t = Instant::now();
    let d = digest_file(path, capacity, algorithm).expect("digest");
    let s = t.elapsed().as_secs_f64();
    println!(
        "{} {:.0} ms, {:.0} MB/s of the file, data_end {}",
        d.checksum,
        s * 1000.0,
        len.min(capacity) as f64 / s / 1e6,
        d.data_end
    );
}
