-- Volumes a saga is creating, recorded before it asks the storage for each
-- (and kept after): its undo deletes these and nothing else, never a volume
-- that was there before it (ImportVm keeps the exported volume ids, so an
-- edited or foreign descriptor can name volumes that exist).
CREATE TABLE saga_volumes (
    saga_id TEXT NOT NULL REFERENCES sagas (id) ON DELETE CASCADE,
    domain_id TEXT NOT NULL,
    image_id TEXT NOT NULL,
    volume_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (saga_id, domain_id, image_id, volume_id)
);
