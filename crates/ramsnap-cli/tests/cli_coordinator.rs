//! The real `ramsnap` binary against a real coordinator (SQLite in a temp
//! file) and a real storage service (a FILE domain in a temp dir), both
//! served over gRPC on 127.0.0.1 in this process. No host agent: hosts are
//! added with an address nobody listens on, so only what needs no running
//! guest is exercised (clusters, hosts, VMs that are down, their disk-only
//! snapshots, previews, operations).
use ramsnap_common::server::{self, ServiceSet};
use ramsnap_common::tls::ClientTransport;
use ramsnap_snapshot::{Coordinator, Options};
use ramsnap_storage::service::{StorageApi, SERVICE_NAME};
use ramsnap_storage::{Config, Storage};
use serde_json::Value;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tokio::sync::oneshot;
use uuid::Uuid;

const MIB: u64 = 1024 * 1024;

struct Services {
    dir: TempDir,
    storage: String,
    snapshot: String,
    stops: Vec<oneshot::Sender<()>>,
}

async fn serve(set: ServiceSet) -> (String, oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        server::serve(listener, vec![set], async move {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    (addr, stop)
}

/// An address where nothing listens (the host agent of every host here).
fn unused_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", listener.local_addr().unwrap())
}

impl Services {
    async fn start() -> Services {
        Services::start_with_failpoints("").await
    }

    /// `failpoints` as RAMSNAP_FAILPOINTS takes them: `saga.node=action,...`.
    async fn start_with_failpoints(failpoints: &str) -> Services {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("roots/nfs1")).unwrap();
        let config = Config {
            state_dir: dir.path().join("state"),
            run_dir: dir.path().join("run"),
            file_roots: vec![dir.path().join("roots")],
            // No such device: the service adopts none of the host's VGs.
            block_devices: vec![dir.path().join("no-such-device")],
        };
        let storage = Storage::open(config).await.unwrap();
        let (storage, stop_storage) = serve(ServiceSet::new(
            SERVICE_NAME,
            StorageApi::new(storage).into_server(),
        ))
        .await;
        let db = format!("sqlite:{}", dir.path().join("coordinator.db").display());
        let options = Options::new(ClientTransport::Insecure).failpoints(failpoints);
        let coordinator = Coordinator::open_with(&db, options).await.unwrap();
        let (snapshot, stop_snapshot) = serve(coordinator.service_set()).await;
        Services {
            dir,
            storage,
            snapshot,
            stops: vec![stop_storage, stop_snapshot],
        }
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_ramsnap"));
        // The in-process servers are plain text on loopback.
        cmd.env("RAMSNAP_INSECURE", "true")
            .arg("--snapshot")
            .arg(&self.snapshot)
            .arg("--storage")
            .arg(&self.storage)
            .args(args)
            .env_remove("RAMSNAP_SNAPSHOT")
            .env_remove("RAMSNAP_STORAGE");
        cmd
    }

    /// Runs `ramsnap --snapshot <coordinator> --storage <storage> ARGS`.
    async fn ramsnap(&self, args: &[&str]) -> Output {
        self.command(args).output().await.unwrap()
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

    /// Runs a command that must fail with exit code `code`; returns stderr.
    async fn fails(&self, code: i32, args: &[&str]) -> String {
        let out = self.ramsnap(args).await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(code), "ramsnap {args:?}: {err}");
        assert!(out.stdout.is_empty(), "ramsnap {args:?} printed on stdout");
        err
    }

    /// A 3.3 cluster with one host (this storage service, no host agent)
    /// and the FILE domain: (cluster, host, domain).
    async fn cluster_with_storage(&self) -> (String, String, String) {
        let root = self.dir.path().join("roots/nfs1").display().to_string();
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
        let domain = reg["domain"]["domain_id"].as_str().unwrap().to_string();
        let cluster = self.json(&["cluster", "create", "--name", "default"]).await["cluster"]["cluster_id"]
            .as_str()
            .unwrap()
            .to_string();
        let host = self
            .json(&[
                "host",
                "add",
                "--cluster",
                &cluster,
                "--name",
                "hv1",
                "--host-address",
                &unused_address(),
                "--storage-address",
                &self.storage,
            ])
            .await["host"]["host_id"]
            .as_str()
            .unwrap()
            .to_string();
        (cluster, host, domain)
    }

    /// A VM that is down with one 64 MiB disk on `domain`; returns its id.
    async fn vm(&self, cluster: &str, domain: &str, name: &str) -> String {
        let disk = format!("{domain}:64M");
        let created = self
            .json(&[
                "vm",
                "create",
                "--name",
                name,
                "--cluster",
                cluster,
                "--memory",
                "256M",
                "--disk",
                &disk,
            ])
            .await;
        created["vm"]["vm_id"].as_str().unwrap().to_string()
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_and_hosts() {
    let s = Services::start().await;

    let created = s
        .json(&["cluster", "create", "--name", "prod", "--version", "3.3"])
        .await;
    Uuid::parse_str(created["request_id"].as_str().unwrap()).expect("a request id is generated");
    let prod = created["cluster"].clone();
    assert_eq!(prod["name"], "prod");
    assert_eq!(prod["compatibility_version"], "3.3");
    assert_eq!(prod["memory_snapshots_supported"], true);
    let prod_id = prod["cluster_id"].as_str().unwrap().to_string();
    Uuid::parse_str(&prod_id).unwrap();

    // Below 3.3, snapshots cannot save memory. Table output: the fields.
    let old = s
        .ok(&["cluster", "create", "--name", "legacy", "--version", "3.2"])
        .await;
    assert!(old.starts_with("id:"), "{old}");
    assert!(
        old.contains("memory snapshots:") && old.trim_end().ends_with("no"),
        "{old}"
    );
    // Creating the same cluster again returns it.
    let again = s.json(&["cluster", "create", "--name", "prod"]).await;
    assert_eq!(again["cluster"], prod);

    let table = s.ok(&["cluster", "list"]).await;
    let mut lines = table.lines();
    assert_eq!(
        words(lines.next().unwrap()),
        ["ID", "NAME", "VERSION", "MEMORY-SNAPSHOTS"]
    );
    let rows: Vec<Vec<&str>> = lines.map(words).collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(
        rows.contains(&vec![prod_id.as_str(), "prod", "3.3", "yes"]),
        "{table}"
    );
    assert!(rows.iter().any(|r| r[1..] == ["legacy", "3.2", "no"]), "{table}");
    let list = s.json(&["cluster", "list"]).await;
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(s.json(&["cluster", "get", &prod_id]).await, prod);
    let get = s.ok(&["cluster", "get", &prod_id]).await;
    assert!(get.contains("compatibility version: 3.3"), "{get}");

    let host_address = unused_address();
    let added = s
        .json(&[
            "host",
            "add",
            "--cluster",
            &prod_id,
            "--name",
            "hv1",
            "--host-address",
            &host_address,
            "--storage-address",
            &s.storage,
        ])
        .await;
    let host = &added["host"];
    assert_eq!(host["name"], "hv1");
    assert_eq!(host["cluster_id"], prod_id.as_str());
    assert_eq!(host["host_address"], host_address.as_str());
    assert_eq!(host["storage_address"], s.storage.as_str());
    let host_id = host["host_id"].as_str().unwrap();

    let table = s.ok(&["host", "list"]).await;
    let mut lines = table.lines();
    assert_eq!(
        words(lines.next().unwrap()),
        ["ID", "NAME", "CLUSTER", "HOST-ADDRESS", "STORAGE-ADDRESS"]
    );
    assert_eq!(
        words(lines.next().unwrap()),
        [host_id, "hv1", &prod_id, &host_address, &s.storage]
    );
    assert_eq!(lines.next(), None);
    let in_prod = s.json(&["host", "list", "--cluster", &prod_id]).await;
    assert_eq!(in_prod, Value::Array(vec![host.clone()]));
    let legacy_id = s
        .json(&["cluster", "list"])
        .await
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "legacy")
        .unwrap()["cluster_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        s.json(&["host", "list", "--cluster", &legacy_id]).await,
        Value::Array(vec![])
    );

    // Nothing else yet.
    let vms = s.ok(&["vm", "list"]).await;
    assert_eq!(
        words(&vms),
        [
            "ID",
            "NAME",
            "STATUS",
            "MEMORY",
            "VCPUS",
            "STATELESS",
            "HOST",
            "LOCKED-BY"
        ]
    );
    // The calls above completed at once; under their request ids they are
    // recorded as operations that succeeded (a reused id names them).
    let ops = s.json(&["operation", "list"]).await;
    let kinds: Vec<&str> = ops
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            assert_eq!(o["state"], "succeeded", "{o}");
            o["kind"].as_str().unwrap()
        })
        .collect();
    assert!(
        kinds.iter().all(|k| ["create_cluster", "add_host"].contains(k)),
        "{kinds:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_names_the_field() {
    let s = Services::start().await;
    let cluster = s.json(&["cluster", "create", "--name", "c"]).await["cluster"]["cluster_id"]
        .as_str()
        .unwrap()
        .to_string();

    // Refused by the coordinator: exit 1, the field and what is wrong.
    let err = s
        .fails(1, &["cluster", "create", "--name", "x", "--version", "banana"])
        .await;
    assert!(err.starts_with("error: INVALID_ARGUMENT: "), "{err}");
    assert!(err.contains("  field compatibility_version: "), "{err}");

    let err = s.fails(1, &["cluster", "create", "--name", ""]).await;
    assert!(err.contains("  field name: "), "{err}");

    let host = |host_address: &'static str, cluster: String| {
        let s = &s;
        async move {
            let args = [
                "host",
                "add",
                "--cluster",
                &cluster,
                "--name",
                "hv",
                "--host-address",
                host_address,
                "--storage-address",
                &s.storage,
            ];
            s.fails(1, &args).await
        }
    };
    let err = host("not-a-url", cluster.clone()).await;
    assert!(err.starts_with("error: INVALID_ARGUMENT: "), "{err}");
    assert!(err.contains("  field host_address: "), "{err}");

    let missing = Uuid::new_v4().to_string();
    let err = host("http://127.0.0.1:1", missing.clone()).await;
    assert!(err.starts_with("error: NOT_FOUND: "), "{err}");
    assert!(
        err.contains(&format!("  resource cluster {missing} not found")),
        "{err}"
    );

    // Unknown VM, snapshot, operation.
    let err = s.fails(1, &["snapshot", "list", &missing]).await;
    assert!(err.starts_with("error: NOT_FOUND: "), "{err}");
    assert!(
        err.contains(&format!("  resource vm {missing} not found")),
        "{err}"
    );
    let err = s.fails(1, &["vm", "get", &missing]).await;
    assert!(err.starts_with("error: NOT_FOUND: "), "{err}");
    let err = s.fails(1, &["snapshot", "create", &missing, "--no-wait"]).await;
    assert!(err.starts_with("error: NOT_FOUND: "), "{err}");
    let err = s.fails(1, &["operation", "get", &missing]).await;
    assert!(err.starts_with("error: NOT_FOUND: "), "{err}");
    assert!(err.contains(&missing), "{err}");
    let err = s.fails(1, &["operation", "watch", &missing]).await;
    assert!(err.starts_with("error: NOT_FOUND: "), "{err}");

    // A VM needs memory; the cluster needs a host to make its disks.
    let disk = format!("{}:64M", Uuid::new_v4());
    let err = s
        .fails(
            1,
            &[
                "vm",
                "create",
                "--name",
                "v",
                "--cluster",
                &cluster,
                "--memory",
                "0",
                "--disk",
                &disk,
            ],
        )
        .await;
    assert!(err.contains("  field memory_bytes: "), "{err}");

    // Refused by the command line itself: usage errors, exit 2.
    let vm = Uuid::new_v4().to_string();
    for args in [
        vec![
            "vm",
            "create",
            "--name",
            "v",
            "--cluster",
            &cluster,
            "--memory",
            "256M",
            "--disk",
            "64M",
        ],
        vec![
            "vm",
            "create",
            "--name",
            "v",
            "--cluster",
            &cluster,
            "--memory",
            "lots",
            "--disk",
            &disk,
        ],
        vec![
            "vm",
            "create",
            "--name",
            "v",
            "--cluster",
            &cluster,
            "--memory",
            "256M",
        ],
        vec!["vm", "watch", &vm, "--until", "running"],
        vec!["snapshot", "create", &vm, "--live"],
        vec!["snapshot", "preview", &vm],
        vec!["snapshot", "clone", &vm, &vm],
        vec!["cluster", "get", ""],
        vec!["host", "list", "--cluster", " "],
    ] {
        let err = s.fails(2, &args).await;
        assert!(err.starts_with("error: "), "{args:?}: {err}");
    }
    // A name that is no object's: exit 1, nothing asked of the service
    // but the list, and the names there are.
    let err = s.fails(1, &["cluster", "get", "prod"]).await;
    assert_eq!(err.trim(), "error: no cluster is named \"prod\" (known: \"c\")");
    let err = s.fails(1, &["vm", "run", "nope", "--no-wait"]).await;
    assert_eq!(err.trim(), "error: no VM is named \"nope\" (there is no VM)");
}

/// The quick tour's commands typed with names: a cluster, a domain, a VM,
/// a snapshot by its description or a prefix of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_instead_of_ids() {
    let s = Services::start().await;
    let (cluster, _host, domain) = s.cluster_with_storage().await;
    let created = s
        .json(&[
            "vm",
            "create",
            "--name",
            "web",
            "--cluster",
            "default",
            "--memory",
            "256M",
            "--disk",
            "files:64M",
        ])
        .await;
    let vm = created["vm"]["vm_id"].as_str().unwrap().to_string();
    assert_eq!(created["vm"]["cluster_id"], cluster.as_str());
    assert_eq!(
        created["vm"]["disks"][0]["domain_id"],
        domain.as_str(),
        "{created}"
    );
    assert_eq!(s.json(&["vm", "get", "web"]).await["vm_id"], vm.as_str());
    assert_eq!(
        s.json(&["cluster", "get", "default"]).await["cluster_id"],
        cluster.as_str()
    );
    let listed = s.json(&["vm", "list", "--cluster", "default"]).await;
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let hosts = s.json(&["host", "list", "--cluster", "default"]).await;
    assert_eq!(hosts[0]["name"], "hv1");

    let first = s
        .json(&["snapshot", "create", "web", "--description", "before upgrade"])
        .await["snapshot"]["snapshot_id"]
        .as_str()
        .unwrap()
        .to_string();
    let second = s
        .json(&[
            "snapshot",
            "create",
            "web",
            "--description",
            "before upgrade, again",
        ])
        .await["snapshot"]["snapshot_id"]
        .as_str()
        .unwrap()
        .to_string();
    // A prefix two descriptions share is ambiguous: both are listed, and
    // nothing is previewed.
    let err = s.fails(1, &["snapshot", "preview", "web", "before"]).await;
    assert!(
        err.starts_with("error: 2 snapshots are with a description starting with \"before\""),
        "{err}"
    );
    assert!(err.contains(&first) && err.contains(&second), "{err}");
    assert_eq!(s.json(&["vm", "get", "web"]).await["status"], "down");
    // The whole description names the first even though it prefixes the
    // second; a unique prefix names the second.
    let in_preview = || async {
        let list = s.json(&["snapshot", "list", "web"]).await;
        let hit: Vec<String> = list
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["status"] == "in-preview")
            .map(|x| x["snapshot_id"].as_str().unwrap().to_string())
            .collect();
        hit
    };
    s.ok(&["snapshot", "preview", "web", "before upgrade"]).await;
    assert_eq!(in_preview().await, vec![first.clone()]);
    s.ok(&["snapshot", "undo", "web"]).await;
    s.ok(&["snapshot", "preview", "web", "before upgrade,"]).await;
    assert_eq!(in_preview().await, vec![second.clone()]);
    s.ok(&["snapshot", "commit", "web"]).await;
    let ops = s.json(&["operation", "list", "--vm", "web"]).await;
    assert!(ops.as_array().unwrap().len() >= 5, "{ops}");
    let updated = s
        .json(&["vm", "update", "web", "--name", "web-2", "--vcpus", "2"])
        .await;
    assert_eq!(
        (updated["vm"]["name"].as_str(), updated["vm"]["vcpus"].as_u64()),
        (Some("web-2"), Some(2))
    );
    let err = s.fails(1, &["cluster", "delete", "default"]).await;
    assert!(err.contains("CLUSTER_NOT_EMPTY"), "{err}");
    s.ok(&["vm", "remove", "web-2"]).await;
    let err = s.fails(1, &["vm", "get", "web"]).await;
    assert_eq!(err.trim(), "error: no VM is named \"web\" (there is no VM)");
    assert!(s.ok(&["host", "remove", "hv1"]).await.starts_with("host "));
    assert!(s
        .ok(&["cluster", "delete", "default"])
        .await
        .starts_with("cluster "));
    assert_eq!(s.json(&["cluster", "list"]).await.as_array().unwrap().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_only_snapshots_of_a_vm_that_is_down() {
    let s = Services::start().await;
    let (cluster, _host, domain) = s.cluster_with_storage().await;

    // vm create waits for its operation and prints the VM.
    let disk = format!("{domain}:64M");
    let created = s
        .json(&[
            "vm",
            "create",
            "--name",
            "web",
            "--cluster",
            &cluster,
            "--memory",
            "256M",
            "--vcpus",
            "2",
            "--disk",
            &disk,
        ])
        .await;
    Uuid::parse_str(created["request_id"].as_str().unwrap()).unwrap();
    assert_eq!(created["operation"]["kind"], "create_vm");
    assert_eq!(created["operation"]["state"], "succeeded");
    let vm = &created["vm"];
    let vm_id = vm["vm_id"].as_str().unwrap().to_string();
    assert_eq!(created["operation"]["result_vm_id"], vm_id.as_str());
    assert_eq!(vm["name"], "web");
    assert_eq!(vm["status"], "down");
    assert_eq!(vm["memory_bytes"], 256 * MIB);
    assert_eq!(vm["vcpus"], 2);
    assert_eq!(vm["stateless"], false);
    assert_eq!(vm["locked_by_operation_id"], Value::Null);
    assert_eq!(vm["disks"][0]["domain_id"], domain.as_str());
    assert_eq!(vm["disks"][0]["capacity_bytes"], 64 * MIB);

    let table = s.ok(&["vm", "list", "--cluster", &cluster]).await;
    let row = table.lines().nth(1).unwrap();
    assert_eq!(
        words(row)[..7],
        [vm_id.as_str(), "web", "down", "256", "MiB", "2", "no"],
        "{table}"
    );
    assert!(row.ends_with(" -"), "not locked: {table}");
    let get = s.ok(&["vm", "get", &vm_id]).await;
    assert!(get.contains("status:") && get.contains("down"), "{get}");
    assert!(get.contains(&format!("{domain}/")), "the disk: {get}");

    // watch prints the status now (then each change); --until returns.
    let watched = s.ok(&["vm", "watch", &vm_id, "--until", "down"]).await;
    assert_eq!(watched.lines().count(), 1, "{watched}");
    assert!(watched.trim_end().ends_with(" UTC  down"), "{watched}");
    let event = s.json(&["vm", "watch", &vm_id, "--until", "down"]).await;
    assert_eq!(event["vm_id"], vm_id.as_str());
    assert_eq!(event["status"], "down");
    // The console is the host agent's, and there is none.
    let err = s.fails(1, &["vm", "console", &vm_id]).await;
    assert!(err.starts_with("error: UNAVAILABLE"), "{err}");

    // A disk-only snapshot; the table output is the result line.
    let out = s
        .ok(&["snapshot", "create", &vm_id, "--description", "before upgrade"])
        .await;
    let line = out.trim_end();
    assert!(
        line.starts_with("snapshot ") && line.ends_with(" created (memory: no)"),
        "{out}"
    );
    let snap_id = line.split_whitespace().nth(1).unwrap().to_string();
    Uuid::parse_str(&snap_id).unwrap();

    // The Snapshots tab: oldest first, the active one last, the MEMORY column.
    let table = s.ok(&["snapshot", "list", &vm_id]).await;
    let mut lines = table.lines();
    assert_eq!(
        words(lines.next().unwrap()),
        ["ID", "TYPE", "STATUS", "MEMORY", "CREATED", "DESCRIPTION"]
    );
    let regular = words(lines.next().unwrap());
    assert_eq!(regular[..4], [snap_id.as_str(), "regular", "ok", "no"], "{table}");
    assert_eq!(regular[regular.len() - 2..], ["before", "upgrade"], "{table}");
    let active = words(lines.next().unwrap());
    assert_eq!(active[1..4], ["active", "ok", "no"], "{table}");
    assert_eq!(lines.next(), None, "{table}");

    let list = s.json(&["snapshot", "list", &vm_id]).await;
    assert_eq!(list[0]["snapshot_id"], snap_id.as_str());
    assert_eq!(list[0]["type"], "regular");
    assert_eq!(list[0]["status"], "ok");
    assert_eq!(list[0]["has_memory"], false);
    assert_eq!(list[0]["memory"], Value::Null);
    assert_eq!(list[0]["description"], "before upgrade");
    assert_eq!(list[1]["type"], "active");
    assert_eq!(s.json(&["snapshot", "get", &snap_id]).await, list[0]);
    let get = s.ok(&["snapshot", "get", &snap_id]).await;
    assert!(get.contains("memory:") && get.contains("no"), "{get}");

    // Save Memory needs a running VM.
    let err = s.fails(1, &["snapshot", "create", &vm_id, "--memory"]).await;
    assert!(err.starts_with("error: FAILED_PRECONDITION: "), "{err}");
    assert!(err.contains("  precondition VM_NOT_RUNNING on "), "{err}");

    // --no-wait prints the operation; operation watch follows it; the same
    // request id returns the same operation.
    let request_id = Uuid::new_v4().to_string();
    let create = [
        "snapshot",
        "create",
        &vm_id,
        "--description",
        "second",
        "--no-wait",
        "--request-id",
        &request_id,
    ];
    let started = s.json(&create).await;
    assert_eq!(started["request_id"], request_id.as_str());
    let op = &started["operation"];
    assert_eq!(op["kind"], "create_snapshot");
    assert_eq!(op["vm_id"], vm_id.as_str());
    assert_eq!(op["request_id"], request_id.as_str());
    let op_id = op["operation_id"].as_str().unwrap().to_string();
    let watched = s.ok(&["operation", "watch", &op_id]).await;
    assert_eq!(
        watched.trim(),
        format!("operation {op_id} (create_snapshot) succeeded")
    );
    let retried = s.json(&create).await;
    assert_eq!(retried["operation"]["operation_id"], op_id.as_str());
    assert_eq!(retried["operation"]["state"], "succeeded");
    let got = s.json(&["operation", "get", &op_id]).await;
    assert_eq!(got["state"], "succeeded");
    Uuid::parse_str(got["snapshot_id"].as_str().unwrap()).unwrap();
    let table = s.ok(&["snapshot", "list", &vm_id]).await;
    assert_eq!(table.lines().count(), 4, "{table}");

    let ops = s.json(&["operation", "list", "--vm", &vm_id]).await;
    let kinds: Vec<&str> = ops
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["state"] == "succeeded")
        .map(|o| o["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "create_snapshot").count(),
        2,
        "{ops}"
    );
    let table = s.ok(&["operation", "list", "--vm", &vm_id]).await;
    assert_eq!(
        words(table.lines().next().unwrap()),
        ["ID", "KIND", "VM", "STATE", "PROGRESS", "CREATED", "ERROR"]
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&op_id) && l.contains(" succeeded ")),
        "{table}"
    );
    // An operation that has ended cannot be cancelled.
    let cancel = s.json(&["operation", "cancel", &op_id]).await;
    assert_eq!(cancel["cancelling"], false);
    let cancel = s.ok(&["operation", "cancel", &op_id]).await;
    assert!(cancel.contains("had already ended: succeeded"), "{cancel}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview_without_memory_warns_then_undo() {
    let s = Services::start().await;
    let (cluster, _host, domain) = s.cluster_with_storage().await;
    let vm_id = s.vm(&cluster, &domain, "db").await;
    let created = s.json(&["snapshot", "create", &vm_id]).await;
    assert_eq!(created["snapshot"]["has_memory"], false);
    let snap_id = created["snapshot"]["snapshot_id"].as_str().unwrap().to_string();

    // Restore Memory asked of a snapshot without memory: ignored, with a
    // warning on stderr; the VM boots on its next run.
    let out = s
        .ramsnap(&["snapshot", "preview", &vm_id, &snap_id, "--restore-memory"])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.starts_with(&format!("warning: snapshot {snap_id} has no memory")),
        "{err}"
    );
    assert_eq!(err.matches("warning: ").count(), 1, "printed once: {err}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout.trim(),
        format!("VM {vm_id} is previewing snapshot {snap_id}; its next run boots")
    );
    let list = s.json(&["snapshot", "list", &vm_id]).await;
    let types: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["type"].as_str().unwrap())
        .collect();
    assert!(types.contains(&"preview"), "{list}");
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|s| s["status"] == "in-preview"),
        "{list}"
    );

    let undone = s.json(&["snapshot", "undo", &vm_id]).await;
    assert_eq!(undone["operation"]["state"], "succeeded");
    assert_eq!(undone["active_snapshot"]["type"], "active");
    assert_eq!(undone["active_snapshot"]["has_memory"], false);
    let list = s.json(&["snapshot", "list", &vm_id]).await;
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    assert!(
        list.as_array().unwrap().iter().all(|s| s["status"] == "ok"),
        "{list}"
    );

    // Removing the VM takes its snapshots along.
    let removed = s.ok(&["vm", "remove", &vm_id]).await;
    assert_eq!(removed.trim(), format!("VM {vm_id} removed"));
    let err = s.fails(1, &["snapshot", "list", &vm_id]).await;
    assert!(err.starts_with("error: NOT_FOUND: "), "{err}");
    assert_eq!(s.json(&["vm", "list"]).await, Value::Array(vec![]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_operation_exits_1_with_its_error() {
    let s = Services::start_with_failpoints("snapshot_create.overlays=error").await;
    let (cluster, _host, domain) = s.cluster_with_storage().await;
    let vm_id = s.vm(&cluster, &domain, "web").await;

    let err = s.fails(1, &["snapshot", "create", &vm_id]).await;
    assert!(err.starts_with("error: operation "), "{err}");
    assert!(err.contains(" (create_snapshot) failed: INTERNAL: "), "{err}");
    assert!(
        err.contains("injected failure at snapshot_create.overlays"),
        "{err}"
    );
    // The failure unwound: no new snapshot, the VM is not locked.
    let list = s.json(&["snapshot", "list", &vm_id]).await;
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    let ops = s.json(&["operation", "list", "--vm", &vm_id]).await;
    let failed = ops
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["kind"] == "create_snapshot")
        .unwrap();
    assert_eq!(failed["state"], "failed");
    assert_eq!(failed["error_code"], "INTERNAL");
    let op_id = failed["operation_id"].as_str().unwrap();
    let err = s.fails(1, &["operation", "watch", op_id]).await;
    assert!(
        err.starts_with(&format!("error: operation {op_id} (create_snapshot) failed: ")),
        "{err}"
    );
    // The failpoint fires once: the next try goes through.
    let out = s.ok(&["snapshot", "create", &vm_id]).await;
    assert!(out.trim_end().ends_with("created (memory: no)"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_leaves_the_operation_running() {
    // The saga stops at its overlays as if the coordinator had crashed: the
    // operation stays RUNNING and the command keeps waiting.
    let s = Services::start_with_failpoints("snapshot_create.overlays=halt").await;
    let (cluster, _host, domain) = s.cluster_with_storage().await;
    let vm_id = s.vm(&cluster, &domain, "web").await;

    let child = s
        .command(&["snapshot", "create", &vm_id])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let op_id = loop {
        let ops = s.json(&["operation", "list", "--vm", &vm_id]).await;
        if let Some(op) = ops
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["kind"] == "create_snapshot")
        {
            assert_eq!(op["state"], "running", "{ops}");
            break op["operation_id"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "no create_snapshot operation: {ops}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Time to start watching (the Ctrl-C handler is set by then).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().await.unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted: the operation goes on"), "{err}");
    assert!(err.contains(&format!("ramsnap operation watch {op_id}")), "{err}");
    assert!(
        err.contains(&format!("ramsnap operation cancel {op_id}")),
        "{err}"
    );
    assert!(out.stdout.is_empty());

    // The VM stays locked by it, as `vm list` shows.
    let table = s.ok(&["vm", "list"]).await;
    assert!(table.lines().nth(1).unwrap().ends_with(&op_id), "{table}");
    let err = s.fails(1, &["snapshot", "create", &vm_id]).await;
    assert!(err.contains("  precondition VM_LOCKED on "), "{err}");
    let op = s.json(&["operation", "get", &op_id]).await;
    assert_eq!(op["state"], "running");
}

#[tokio::test]
async fn unreachable_coordinator() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ramsnap"))
        .env("RAMSNAP_INSECURE", "true")
        .args(["cluster", "list"])
        .env("RAMSNAP_SNAPSHOT", addr.to_string())
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.starts_with(&format!(
            "error: cannot reach the snapshot service at http://{addr} (set --snapshot or RAMSNAP_SNAPSHOT)"
        )),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_list_and_import_a_vm() {
    let s = Services::start().await;
    let (cluster, _host, domain) = s.cluster_with_storage().await;
    let export_root = s.dir.path().join("roots/export");
    std::fs::create_dir_all(&export_root).unwrap();
    let export_root = export_root.display().to_string();
    let reg = s
        .json(&[
            "domain",
            "register",
            "--name",
            "exports",
            "--type",
            "file",
            "--location",
            &export_root,
            "--role",
            "export",
        ])
        .await;
    let exports = reg["domain"]["domain_id"].as_str().unwrap().to_string();
    let vm_id = s.vm(&cluster, &domain, "web").await;
    s.json(&["snapshot", "create", &vm_id, "--description", "before"])
        .await;

    // An empty export domain: the header only; a data domain is refused.
    let table = s.ok(&["vm", "exported", "--domain", &exports]).await;
    assert_eq!(
        words(table.lines().next().unwrap()),
        [
            "ID",
            "NAME",
            "MEMORY",
            "DISKS",
            "SNAPSHOTS",
            "WITH-MEMORY",
            "COLLAPSED",
            "EXPORTED"
        ]
    );
    assert_eq!(table.lines().count(), 1, "{table}");
    assert_eq!(
        s.json(&["vm", "exported", "--domain", &exports]).await,
        Value::Array(vec![])
    );
    let err = s.fails(1, &["vm", "exported", "--domain", &domain]).await;
    assert!(err.contains("NOT_AN_EXPORT_DOMAIN"), "{err}");

    // Export: every snapshot (the active one too), no memory (never run).
    let exported = s.ok(&["vm", "export", &vm_id, "--domain", &exports]).await;
    assert_eq!(
        exported.trim(),
        format!("VM {vm_id} (web) exported to domain {exports}: 2 snapshots (0 with memory), 1 disk")
    );
    // Once only, unless --force-override.
    let err = s.fails(1, &["vm", "export", &vm_id, "--domain", &exports]).await;
    assert!(err.contains("VM_ALREADY_EXPORTED"), "{err}");
    let again = s
        .json(&[
            "vm",
            "export",
            &vm_id,
            "--domain",
            &exports,
            "--force-override",
            "--collapse-snapshots",
        ])
        .await;
    assert_eq!(again["operation"]["kind"], "export_vm");
    assert_eq!(again["operation"]["state"], "succeeded");
    assert_eq!(again["exported"]["vm_id"], vm_id.as_str());
    assert_eq!(again["exported"]["collapsed"], true);

    // The list: a row per VM; an unreadable descriptor is a warning.
    let bogus = Uuid::new_v4().to_string();
    let bogus_dir = format!("{export_root}/{exports}/master/vms/{bogus}");
    std::fs::create_dir_all(&bogus_dir).unwrap();
    std::fs::write(format!("{bogus_dir}/{bogus}.ovf"), "<not-an-ovf/>").unwrap();
    let out = s.ramsnap(&["vm", "exported", "--domain", &exports]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.starts_with(&format!("warning: unreadable VM descriptor {bogus}: ")),
        "{err}"
    );
    let table = String::from_utf8(out.stdout).unwrap();
    let row = words(table.lines().nth(1).unwrap());
    assert_eq!(
        row[..8],
        [vm_id.as_str(), "web", "256", "MiB", "1", "1", "0", "yes"],
        "{table}"
    );
    let list = s.json(&["vm", "exported", "--domain", &exports]).await;
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["memory_bytes"], 256 * MIB);
    assert_eq!(list[0]["snapshots"][0]["type"], "active");
    assert_eq!(list[0]["snapshots"][0]["has_memory"], false);

    // The VM is still here: an import keeping its id is refused; as a
    // clone it gets a new id (no memory to warn about).
    let import = [
        "vm",
        "import",
        vm_id.as_str(),
        "--domain",
        exports.as_str(),
        "--cluster",
        cluster.as_str(),
        "--target-domain",
        domain.as_str(),
    ];
    let err = s.fails(1, &import).await;
    assert!(err.contains("VM_ALREADY_EXISTS"), "{err}");
    let out = s
        .ramsnap(&[&import[..], &["--as-clone", "--name", "web-copy"]].concat())
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out), "", "no memory, no warning");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let copy = words(&stdout)[1].to_string();
    assert_ne!(copy, vm_id);
    assert_eq!(
        stdout.trim(),
        format!("VM {copy} (web-copy) imported from export domain {exports}")
    );

    // Once the VM is gone, it comes back with its id.
    s.ok(&["vm", "remove", &vm_id]).await;
    let out = s.ramsnap(&[&["-o", "json"][..], &import].concat()).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let imported: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(imported["operation"]["kind"], "import_vm");
    assert_eq!(imported["operation"]["result_vm_id"], vm_id.as_str());
    assert_eq!(imported["vm"]["vm_id"], vm_id.as_str());
    assert_eq!(imported["vm"]["name"], "web");
    assert_eq!(imported["warnings"], Value::Array(vec![]));

    // Usage errors: exit 2.
    for args in [
        vec!["vm", "export", &vm_id],
        vec!["vm", "import", &vm_id, "--domain", &exports],
        vec!["vm", "exported"],
    ] {
        let err = s.fails(2, &args).await;
        assert!(err.starts_with("error: "), "{args:?}: {err}");
    }
}
