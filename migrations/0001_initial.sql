-- The coordinator's schema. One migration set serves PostgreSQL 15 and SQLite
-- (through sqlx's Any driver), so only portable SQL is used here: TEXT, BIGINT
-- and BOOLEAN columns, CHECK constraints, partial indexes, no SERIAL and no
-- vendor types. Ids are hyphenated UUIDs as TEXT; timestamps are unix
-- milliseconds as BIGINT, set by the application.

CREATE TABLE clusters (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    -- "3.3" as shown to users; major/minor make "below 3.3" a plain query.
    compatibility_version TEXT NOT NULL,
    compatibility_major BIGINT NOT NULL CHECK (compatibility_major >= 0),
    compatibility_minor BIGINT NOT NULL CHECK (compatibility_minor >= 0),
    created_at BIGINT NOT NULL
);

CREATE INDEX clusters_by_compatibility ON clusters (compatibility_major, compatibility_minor);

-- Long-running operations, and the request ids that make their creation
-- idempotent. vm_id is deliberately not a foreign key: an operation's record
-- outlives the VM it removed.
CREATE TABLE operations (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    vm_id TEXT,
    request_id TEXT UNIQUE,
    state TEXT NOT NULL CHECK (state IN ('RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED')),
    progress_processed BIGINT NOT NULL DEFAULT 0,
    progress_total BIGINT NOT NULL DEFAULT 0,
    error TEXT,
    -- JSON document, set when the operation succeeds.
    result TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE INDEX operations_by_vm ON operations (vm_id, created_at);
CREATE INDEX operations_by_created_at ON operations (created_at);

CREATE TABLE vms (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    cluster_id TEXT NOT NULL REFERENCES clusters (id),
    memory_bytes BIGINT NOT NULL CHECK (memory_bytes >= 0),
    vcpus BIGINT NOT NULL CHECK (vcpus > 0),
    stateless BOOLEAN NOT NULL DEFAULT FALSE,
    host_id TEXT,
    status TEXT NOT NULL CHECK (status IN (
        'Down', 'PoweringUp', 'Up', 'Paused', 'RestoringState', 'SavingState', 'PoweringDown',
        'ImageLocked'
    )),
    -- The storage domain that holds the VM's disks and memory volumes.
    disk_domain_id TEXT NOT NULL,
    -- The operation that holds the VM lock (NULL: unlocked).
    lock_operation_id TEXT REFERENCES operations (id) ON DELETE SET NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE INDEX vms_by_cluster ON vms (cluster_id);
CREATE INDEX vms_by_lock_operation ON vms (lock_operation_id);

CREATE TABLE vm_disks (
    vm_id TEXT NOT NULL REFERENCES vms (id) ON DELETE CASCADE,
    disk_id TEXT NOT NULL,
    domain_id TEXT NOT NULL,
    image_id TEXT NOT NULL,
    capacity_bytes BIGINT NOT NULL CHECK (capacity_bytes >= 0),
    PRIMARY KEY (vm_id, disk_id)
);

CREATE TABLE snapshots (
    id TEXT PRIMARY KEY,
    vm_id TEXT NOT NULL REFERENCES vms (id) ON DELETE CASCADE,
    snapshot_type TEXT NOT NULL CHECK (snapshot_type IN ('ACTIVE', 'REGULAR', 'PREVIEW', 'STATELESS')),
    status TEXT NOT NULL CHECK (status IN ('OK', 'LOCKED', 'IN_PREVIEW')),
    description TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    -- The memory volume: the memory dump and the VM configuration at the
    -- moment the snapshot was taken. All six are NULL when there is no memory
    -- (the state of every snapshot from before this feature).
    memory_dump_domain_id TEXT,
    memory_dump_image_id TEXT,
    memory_dump_volume_id TEXT,
    memory_meta_domain_id TEXT,
    memory_meta_image_id TEXT,
    memory_meta_volume_id TEXT,
    CHECK (
        (memory_dump_domain_id IS NULL AND memory_dump_image_id IS NULL
            AND memory_dump_volume_id IS NULL AND memory_meta_domain_id IS NULL
            AND memory_meta_image_id IS NULL AND memory_meta_volume_id IS NULL)
        OR (memory_dump_domain_id IS NOT NULL AND memory_dump_image_id IS NOT NULL
            AND memory_dump_volume_id IS NOT NULL AND memory_meta_domain_id IS NOT NULL
            AND memory_meta_image_id IS NOT NULL AND memory_meta_volume_id IS NOT NULL)
    )
);

-- snapshot_by_vm_type_status and the listing of a VM's snapshots.
CREATE INDEX snapshots_by_vm_type_status ON snapshots (vm_id, snapshot_type, status);
-- A VM has exactly one active snapshot (its current configuration and disks).
CREATE UNIQUE INDEX snapshots_one_active_per_vm ON snapshots (vm_id) WHERE snapshot_type = 'ACTIVE';
-- Reference counting of memory volumes shared between snapshots.
CREATE INDEX snapshots_by_memory_dump ON snapshots (memory_dump_volume_id)
    WHERE memory_dump_volume_id IS NOT NULL;

-- Which volume of each disk a snapshot points at.
CREATE TABLE snapshot_disks (
    snapshot_id TEXT NOT NULL REFERENCES snapshots (id) ON DELETE CASCADE,
    disk_id TEXT NOT NULL,
    domain_id TEXT NOT NULL,
    image_id TEXT NOT NULL,
    volume_id TEXT NOT NULL,
    PRIMARY KEY (snapshot_id, disk_id)
);

CREATE INDEX snapshot_disks_by_volume ON snapshot_disks (volume_id);

-- The saga log, as in omicron/steno: the saga itself and an append-only
-- table of node events.
CREATE TABLE sagas (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    -- JSON document: the saga's parameters.
    params TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('RUNNING', 'UNWINDING', 'DONE', 'ABANDONED')),
    -- The coordinator instance that executes the saga.
    owner TEXT NOT NULL,
    operation_id TEXT REFERENCES operations (id),
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE INDEX sagas_unfinished ON sagas (state, created_at) WHERE state IN ('RUNNING', 'UNWINDING');
CREATE INDEX sagas_by_operation ON sagas (operation_id);

CREATE TABLE saga_node_events (
    saga_id TEXT NOT NULL REFERENCES sagas (id) ON DELETE CASCADE,
    node_id BIGINT NOT NULL CHECK (node_id >= 0),
    event_type TEXT NOT NULL CHECK (event_type IN (
        'started', 'succeeded', 'failed', 'undo_started', 'undo_finished'
    )),
    -- JSON document: a succeeded node's output or a failed node's error.
    data TEXT,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (saga_id, node_id, event_type)
);
