-- One metadata writer per storage domain (VDSM's SPM, per domain): the
-- host whose storage agent makes every metadata change (create, delete,
-- merge, copy target, descriptors) on a domain that several hosts share.
-- generation goes up each time the role moves; the writer's agent records
-- the highest generation on the domain itself and refuses calls made under
-- a lower one (STALE_WRITER).
CREATE TABLE domain_writers (
    domain_id TEXT PRIMARY KEY,
    host_id TEXT NOT NULL REFERENCES hosts (id),
    generation BIGINT NOT NULL,
    -- Unix milliseconds.
    assigned_at BIGINT NOT NULL
);
