-- The saga log names each node, so that a saga resumed by a release whose
-- definition gained, lost or reordered nodes is matched by names, never read
-- against the wrong nodes by position. NULL on events logged before this
-- column (read by position, as they were written).
ALTER TABLE saga_node_events ADD COLUMN node_name TEXT;
-- Why the saga is not executed (its log does not fit its current
-- definition); NULL for a saga that runs. A parked saga keeps its locks and
-- is tried again at every start, so that a release that fits (a roll-back)
-- resumes it.
ALTER TABLE sagas ADD COLUMN parked TEXT;
