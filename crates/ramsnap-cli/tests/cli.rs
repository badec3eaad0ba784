//! The real `ramsnap` binary against a real storage service served over
//! gRPC on 127.0.0.1, with a FILE domain in a temporary directory.
use ramsnap_common::server::{self, ServiceSet};
use ramsnap_storage::service::{StorageApi, SERVICE_NAME};
use ramsnap_storage::{Config, Storage};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Output;
use tempfile::TempDir;
use tokio::sync::oneshot;
use uuid::Uuid;

const MIB: u64 = 1024 * 1024;

struct Server {
    dir: TempDir,
    addr: String,
    stop: Option<oneshot::Sender<()>>,
}

impl Server {
    async fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("roots/nfs1")).unwrap();
        let config = Config {
            state_dir: dir.path().join("state"),
            run_dir: dir.path().join("run"),
            file_roots: vec![dir.path().join("roots")],
            // No such device: the service adopts none of the host's VGs
            // (other tests' BLOCK domains).
            block_devices: vec![dir.path().join("no-such-device")],
        };
        let storage = Storage::open(config).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let set = ServiceSet::new(SERVICE_NAME, StorageApi::new(storage).into_server());
        tokio::spawn(async move {
            server::serve(listener, vec![set], async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Server {
            dir,
            addr,
            stop: Some(stop),
        }
    }

    fn file_root(&self) -> PathBuf {
        self.dir.path().join("roots/nfs1")
    }

    /// Runs `ramsnap --storage <this server> ARGS`.
    async fn ramsnap(&self, args: &[&str]) -> Output {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_ramsnap"))
            // The in-process server is plain text on loopback.
            .env("RAMSNAP_INSECURE", "true")
            .arg("--storage")
            .arg(&self.addr)
            .args(args)
            .env_remove("RAMSNAP_STORAGE")
            .output()
            .await
            .unwrap()
    }

    /// Runs a command that must succeed; returns its stdout.
    async fn ok(&self, args: &[&str]) -> String {
        let out = self.ramsnap(args).await;
        assert!(
            out.status.success(),
            "ramsnap {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs a command with `-o json` that must succeed; returns its JSON.
    async fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let text = self.ok(&all).await;
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: not JSON:\n{text}"))
    }

    /// Registers the FILE domain and returns its id.
    async fn file_domain(&self) -> String {
        let root = self.file_root().display().to_string();
        let reg = self
            .json(&[
                "domain",
                "register",
                "--name",
                "files",
                "--type",
                "file",
                "--location",
                &root,
            ])
            .await;
        reg["domain"]["domain_id"].as_str().unwrap().to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.take().map(|s| s.send(()));
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ref_of(volume: &Value) -> String {
    let r = &volume["ref"];
    format!(
        "{}/{}/{}",
        r["domain_id"].as_str().unwrap(),
        r["image_id"].as_str().unwrap(),
        r["volume_id"].as_str().unwrap()
    )
}

#[tokio::test]
async fn domain_register_list_and_get() {
    let server = Server::start().await;
    let root = server.file_root().display().to_string();
    let id = Uuid::new_v4().to_string();
    let reg = server
        .json(&[
            "domain",
            "register",
            "--name",
            "files",
            "--type",
            "file",
            "--location",
            &root,
            "--id",
            &id,
        ])
        .await;
    assert_eq!(reg["adopted"], false);
    assert_eq!(reg["domain"]["domain_id"], id.as_str());
    assert_eq!(reg["domain"]["type"], "file");

    // Registering the same directory again adopts the domain there.
    let again = server
        .ok(&[
            "domain",
            "register",
            "--name",
            "files",
            "--type",
            "file",
            "--location",
            &root,
        ])
        .await;
    assert!(again.starts_with("adopted the existing domain"), "{again}");
    assert!(again.contains(&id), "{again}");

    let table = server.ok(&["domain", "list"]).await;
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["ID", "NAME", "TYPE", "CAPACITY", "FREE", "LOCATION"]);
    let row = lines.next().unwrap();
    assert!(row.starts_with(&format!("{id}  files  file  ")), "{table}");
    assert!(row.ends_with(&root), "{table}");
    assert!(row.contains("iB"), "sizes are human-readable: {table}");
    assert_eq!(lines.next(), None);

    let list = server.json(&["domain", "list"]).await;
    let domains = list.as_array().unwrap();
    assert_eq!(domains.len(), 1);
    assert_eq!(domains[0]["domain_id"], id.as_str());
    assert_eq!(domains[0]["name"], "files");
    assert_eq!(domains[0]["location"], root.as_str());
    assert!(domains[0]["capacity_bytes"].as_u64().unwrap() > 0);

    let get = server.ok(&["domain", "get", &id]).await;
    assert!(get.contains("name:") && get.contains("files"), "{get}");
    // By name too; a name that is no domain's says which there are.
    let by_name = server.json(&["domain", "get", "files"]).await;
    assert_eq!(by_name["domain_id"], id.as_str());
    let out = server.ramsnap(&["volume", "list", "--domain", "filez"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out).trim(),
        "error: no storage domain is named \"filez\" (known: \"files\")"
    );
    // Free space moves with whatever else writes to the file system.
    let without_free = |mut d: Value| {
        d.as_object_mut().unwrap().remove("free_bytes");
        d
    };
    assert_eq!(
        without_free(server.json(&["domain", "get", &id]).await),
        without_free(domains[0].clone())
    );
}

#[tokio::test]
async fn volume_create_list_get_prepare_teardown_delete() {
    let server = Server::start().await;
    let domain = server.file_domain().await;

    let created = server
        .json(&[
            "volume",
            "create",
            "--domain",
            &domain,
            "--size",
            "8M",
            "--description",
            "boot disk",
        ])
        .await;
    Uuid::parse_str(created["request_id"].as_str().unwrap()).expect("a request id is generated");
    let volume = &created["volume"];
    assert_eq!(volume["capacity_bytes"], 8 * MIB);
    assert_eq!(volume["format"], "raw");
    assert_eq!(volume["allocation"], "sparse");
    assert_eq!(volume["purpose"], "disk");
    assert_eq!(volume["legality"], "legal");
    assert_eq!(volume["parent_volume_id"], Value::Null);
    assert_eq!(volume["description"], "boot disk");
    let vref = ref_of(volume);
    let image = volume["ref"]["image_id"].as_str().unwrap();
    let volume_id = volume["ref"]["volume_id"].as_str().unwrap();

    // A second volume in another image, to see --image filter.
    server
        .ok(&["volume", "create", "--domain", &domain, "--size", "1048576"])
        .await;

    let table = server.ok(&["volume", "list", "--domain", &domain]).await;
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "IMAGE",
            "VOLUME",
            "PARENT",
            "FORMAT",
            "ALLOCATION",
            "PURPOSE",
            "LEGALITY",
            "CAPACITY",
            "ALLOCATED"
        ]
    );
    assert_eq!(table.lines().count(), 3, "{table}");
    let row = table.lines().find(|l| l.contains(volume_id)).unwrap();
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        &cells[..9],
        [image, volume_id, "-", "raw", "sparse", "disk", "legal", "8", "MiB"]
    );

    let only = server
        .json(&["volume", "list", "--domain", &domain, "--image", image])
        .await;
    assert_eq!(only.as_array().unwrap().len(), 1);
    assert_eq!(only[0], *volume);

    assert_eq!(server.json(&["volume", "get", &vref]).await, *volume);
    let get = server.ok(&["volume", "get", &vref]).await;
    assert!(get.starts_with("ref:"), "{get}");
    assert!(
        get.contains(&vref) && get.contains("8 MiB (8388608 bytes)"),
        "{get}"
    );

    let path = server.ok(&["volume", "prepare", &vref]).await;
    let path = PathBuf::from(path.trim());
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 8 * MIB);
    let prepared = server.json(&["volume", "prepare", &vref]).await;
    assert_eq!(prepared["path"], path.display().to_string());
    let torn = server.ok(&["volume", "teardown", &vref]).await;
    assert_eq!(torn.trim(), format!("tore down {vref}"));

    let deleted = server.json(&["volume", "delete", &vref]).await;
    assert_eq!(deleted["deleted"], volume["ref"]);
    let out = server.ramsnap(&["volume", "get", &vref]).await;
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.starts_with("error: NOT_FOUND: "), "{err}");
    assert!(
        err.contains(&format!("  resource volume {vref} not found")),
        "{err}"
    );
}

#[tokio::test]
async fn copy_with_json_output() {
    let server = Server::start().await;
    let domain = server.file_domain().await;
    let created = server
        .json(&["volume", "create", "--domain", &domain, "--size", "4M"])
        .await;
    let source = ref_of(&created["volume"]);
    let path = server.ok(&["volume", "prepare", &source]).await;
    std::fs::write(path.trim(), b"ramsnap").unwrap();
    server.ok(&["volume", "teardown", &source]).await;

    let request_id = Uuid::new_v4().to_string();
    let copy = [
        "volume",
        "copy",
        &source,
        "--to-domain",
        &domain,
        "--request-id",
        &request_id,
    ];
    let copied = server.json(&copy).await;
    assert_eq!(copied["request_id"], request_id.as_str());
    let target = &copied["volume"];
    assert_eq!(target["capacity_bytes"], 4 * MIB);
    assert_eq!(target["legality"], "legal");
    assert_eq!(target["ref"]["domain_id"], domain.as_str());
    assert_ne!(ref_of(target), source);

    let path = server.ok(&["volume", "prepare", &ref_of(target)]).await;
    let data = std::fs::read(path.trim()).unwrap();
    assert_eq!(&data[..7], b"ramsnap");

    // The same request id finds the first copy instead of copying again.
    let retried = server.json(&copy).await;
    assert_eq!(retried["volume"]["ref"], target["ref"]);
    let volumes = server.json(&["volume", "list", "--domain", &domain]).await;
    assert_eq!(volumes.as_array().unwrap().len(), 2);

    // In table mode the new volume is printed at the end (no terminal: no bar).
    let table = server
        .ok(&["volume", "copy", &source, "--to-domain", &domain])
        .await;
    assert!(
        table.starts_with("ref:") && table.contains("legality:"),
        "{table}"
    );
}

#[tokio::test]
async fn memory_volumes() {
    let server = Server::start().await;
    let domain = server.file_domain().await;
    let out = server
        .json(&[
            "volume",
            "create-memory",
            "--domain",
            &domain,
            "--memory",
            "64M",
            "--mode",
            "paused",
        ])
        .await;
    assert_eq!(out["dump"]["purpose"], "memory-dump");
    assert_eq!(out["dump"]["capacity_bytes"], (64 + 200) * MIB);
    assert_eq!(out["metadata"]["purpose"], "memory-metadata");
    let table = server.ok(&["volume", "list", "--domain", &domain]).await;
    assert!(
        table.contains("memory-dump") && table.contains("memory-metadata"),
        "{table}"
    );
}

#[tokio::test]
async fn service_errors_print_their_details() {
    let server = Server::start().await;
    let domain = server.file_domain().await;

    let out = server
        .ramsnap(&["volume", "create", "--domain", &domain, "--size", "0"])
        .await;
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.starts_with("error: INVALID_ARGUMENT: "), "{err}");
    assert!(err.contains("  field capacity_bytes: "), "{err}");
    assert!(out.stdout.is_empty());

    let missing = Uuid::new_v4().to_string();
    let out = server.ramsnap(&["domain", "get", &missing]).await;
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.starts_with("error: NOT_FOUND: "), "{err}");
    assert!(
        err.contains(&format!("  resource storage_domain {missing} not found")),
        "{err}"
    );

    // A parent cannot be deleted while its child uses it.
    let base = server
        .json(&[
            "volume", "create", "--domain", &domain, "--size", "8M", "--format", "cow",
        ])
        .await;
    let base_ref = ref_of(&base["volume"]);
    let image = base["volume"]["ref"]["image_id"].as_str().unwrap();
    let parent = base["volume"]["ref"]["volume_id"].as_str().unwrap();
    let child = server
        .json(&[
            "volume", "create", "--domain", &domain, "--size", "8M", "--format", "cow", "--image", image,
            "--parent", parent,
        ])
        .await;
    assert_eq!(child["volume"]["parent_volume_id"], parent);
    let table = server.ok(&["volume", "list", "--domain", &domain]).await;
    assert!(
        table.lines().any(|l| l.split_whitespace().nth(2) == Some(parent)),
        "{table}"
    );
    let out = server.ramsnap(&["volume", "delete", &base_ref]).await;
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.starts_with("error: FAILED_PRECONDITION: "), "{err}");
    assert!(
        err.contains(&format!("  precondition VOLUME_HAS_CHILDREN on {base_ref}: ")),
        "{err}"
    );
}

#[tokio::test]
async fn bad_input_is_a_usage_error() {
    let server = Server::start().await;
    let domain = Uuid::new_v4().to_string();
    for args in [
        vec!["volume", "create", "--domain", &domain, "--size", "10X"],
        vec!["volume", "create", "--domain", &domain, "--size", "1.3"],
        vec!["volume", "get", "not-a-ref"],
        vec!["volume", "get", "a/b/c"],
        vec!["domain", "get", ""],
        vec![
            "domain",
            "register",
            "--name",
            "x",
            "--type",
            "nfs",
            "--location",
            "/x",
        ],
        vec!["volume", "list", "--domain", &domain, "-o", "yaml"],
    ] {
        let out = server.ramsnap(&args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).starts_with("error: "), "{args:?}: {}", stderr(&out));
    }
}

#[tokio::test]
async fn unreachable_service() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ramsnap"))
        .env("RAMSNAP_INSECURE", "true")
        .args(["domain", "list"])
        .env("RAMSNAP_STORAGE", addr.to_string())
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.starts_with(&format!(
            "error: cannot reach the storage service at http://{addr}"
        )),
        "{err}"
    );
}

/// Text from the server is printed escaped: a description with ESC (a
/// terminal escape sequence), CR, LF and a bidi override shows as
/// `\u{1b}`, `\r`, `\n`, `\u{202e}` in tables, field lists and errors, never
/// raw. JSON carries it as JSON escapes it. The storage service refuses such
/// a description in a request; one already on a domain (written by an older
/// version, or by hand on the NFS export) is what the server sends back.
#[tokio::test]
async fn server_text_is_printed_escaped() {
    let server = Server::start().await;
    let domain = server.file_domain().await;
    let evil = "evil\u{1b}[2J\rcleared\u{202e}exe.txt\nnext\u{9b}31m";
    let escaped = "evil\\u{1b}[2J\\rcleared\\u{202e}exe.txt\\nnext\\u{9b}31m";
    let refused = server
        .ramsnap(&[
            "volume",
            "create",
            "--domain",
            &domain,
            "--size",
            "1M",
            "--description",
            evil,
        ])
        .await;
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let created = server
        .json(&[
            "volume",
            "create",
            "--domain",
            &domain,
            "--size",
            "1M",
            "--description",
            "placeholder",
        ])
        .await;
    let vref = ref_of(&created["volume"]);
    // The description as it lies on the domain.
    let v = &created["volume"]["ref"];
    let meta = server
        .file_root()
        .join(v["domain_id"].as_str().unwrap())
        .join("images")
        .join(v["image_id"].as_str().unwrap())
        .join(format!("{}.meta", v["volume_id"].as_str().unwrap()));
    let text = std::fs::read_to_string(&meta).unwrap();
    let json_evil = serde_json::to_string(evil).unwrap();
    std::fs::write(&meta, text.replace("\"placeholder\"", &json_evil)).unwrap();
    let raw = |text: &str| {
        text.chars()
            .filter(|c| c.is_control() && *c != '\n' || matches!(c, '\u{202a}'..='\u{202e}'))
            .collect::<Vec<char>>()
    };
    for args in [
        vec!["volume", "get", vref.as_str()],
        vec!["volume", "list", "--domain", domain.as_str()],
    ] {
        let out = server.ok(&args).await;
        assert!(
            raw(&out).is_empty(),
            "{args:?} printed {:?} raw: {out:?}",
            raw(&out)
        );
        assert!(!out.contains("\nnext"), "{out:?}");
    }
    let get = server.ok(&["volume", "get", &vref]).await;
    assert!(get.contains(escaped), "{get:?}");
    // An error that quotes what it refuses.
    let out = server
        .ramsnap(&[
            "domain",
            "register",
            "--name",
            "x",
            "--type",
            "file",
            "--location",
            "/no/such\u{1b}[2J\u{202e}dir",
        ])
        .await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        raw(&err).is_empty(),
        "stderr printed {:?} raw: {err:?}",
        raw(&err)
    );
    // The storage agent names the field and the character, never echoing
    // the raw text.
    assert!(
        err.contains("location") && err.contains("U+001B"),
        "the error names what it refuses: {err:?}"
    );
}

/// `volume list` reads every page (the service answers 500 at a time by
/// default): 520 volumes are all listed, once each, and --purpose filters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_read_every_page() {
    use ramsnap_proto::storage::v1 as pb;
    let server = Server::start().await;
    let domain = server.file_domain().await;
    let mut client = pb::storage_service_client::StorageServiceClient::connect(server.addr.clone())
        .await
        .unwrap();
    for _ in 0..520 {
        client
            .create_volume(pb::CreateVolumeRequest {
                domain_id: domain.clone(),
                capacity_bytes: MIB,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let listed = server.json(&["volume", "list", "--domain", &domain]).await;
    let ids: std::collections::BTreeSet<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["ref"]["volume_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 520);
    assert_eq!(listed.as_array().unwrap().len(), 520);
    let dumps = server
        .json(&["volume", "list", "--domain", &domain, "--purpose", "memory-dump"])
        .await;
    assert_eq!(dumps.as_array().unwrap().len(), 0);
}
