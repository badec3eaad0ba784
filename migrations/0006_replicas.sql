-- Coordinator replicas. Each holds a lease, renewed by its heartbeat and
-- judged by the database's clock. A saga belongs to one replica at a time
-- (sagas.owner holds its id) under a generation: when a replica's lease
-- runs out, another adopts its unfinished sagas and bumps their generation,
-- and from then on every saga-log write of the old owner is refused.
CREATE TABLE coordinators (
    id TEXT PRIMARY KEY,
    -- For people: "hostname:pid".
    name TEXT NOT NULL,
    -- The machine boot and PID namespace the replica runs in: a replica
    -- started later in the same ones can tell that this one's process is
    -- gone (a restart on the same host need not wait for the lease).
    local_key TEXT NOT NULL,
    pid BIGINT NOT NULL,
    started_at BIGINT NOT NULL,
    -- Unix milliseconds, by the database's clock.
    lease_expires_at BIGINT NOT NULL
);

ALTER TABLE sagas ADD COLUMN generation BIGINT NOT NULL DEFAULT 0;
