-- SuspendVm (oVirt's hibernate): a suspended VM is stored Down with this
-- flag set (its memory on its ACTIVE snapshot) and reported SUSPENDED. A
-- column rather than a new status value, because the status CHECK cannot
-- be changed in place on SQLite.
ALTER TABLE vms ADD COLUMN suspended BOOLEAN NOT NULL DEFAULT FALSE;
