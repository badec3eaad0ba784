-- Hosts of a cluster: where their HostService and StorageService answer.
CREATE TABLE hosts (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    cluster_id TEXT NOT NULL REFERENCES clusters (id),
    host_address TEXT NOT NULL,
    storage_address TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE INDEX hosts_by_cluster ON hosts (cluster_id);

-- Direct-boot images of a VM (names inside each host's boot directory).
ALTER TABLE vms ADD COLUMN kernel TEXT NOT NULL DEFAULT '';
ALTER TABLE vms ADD COLUMN initrd TEXT NOT NULL DEFAULT '';
ALTER TABLE vms ADD COLUMN cmdline TEXT NOT NULL DEFAULT '';

-- A client asked the operation to stop; its saga unwinds at the next node.
ALTER TABLE operations ADD COLUMN cancel_requested BIGINT NOT NULL DEFAULT 0;
-- JSON array of warnings for the client (e.g. "memory discarded").
ALTER TABLE operations ADD COLUMN warnings TEXT NOT NULL DEFAULT '[]';
