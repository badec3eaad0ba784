-- What the request that started an operation asked for: "<rpc>:sha256:<hex>"
-- of the prost-encoded request with its request_id cleared. A request id
-- reused for a different request (another RPC, or other fields) is refused
-- with ALREADY_EXISTS naming the operation it started. NULL for operations
-- started before this column existed: those compare by kind only.
ALTER TABLE operations ADD COLUMN request_fingerprint TEXT;
