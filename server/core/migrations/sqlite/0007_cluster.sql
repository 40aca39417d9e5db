-- Several replicas (PostgreSQL only in practice: an SQLite file has one owner, but both
-- engines keep the same tables). `cluster_replicas`: every replica process with the URL the
-- others reach it at and its last heartbeat (ms since the epoch); a replica whose heartbeat
-- is older than a few intervals is dead, and so are its tunnel records. `cluster_tunnels`:
-- which replica holds the live tunnel of a guest, with an epoch that grows with every new
-- tunnel of that guest (whichever replica accepted it), so a stale record is recognised;
-- a released record keeps its epoch with an empty replica_id, so epochs never repeat.
CREATE TABLE cluster_replicas (
    replica_id     TEXT    PRIMARY KEY,
    advertise_url  TEXT    NOT NULL,
    started_at     INTEGER NOT NULL,
    heartbeat_at   INTEGER NOT NULL
);

CREATE TABLE cluster_tunnels (
    guest_id     TEXT    PRIMARY KEY,
    replica_id   TEXT    NOT NULL,
    epoch        INTEGER NOT NULL,
    since        INTEGER NOT NULL
);

CREATE INDEX cluster_tunnels_by_replica ON cluster_tunnels (replica_id);
