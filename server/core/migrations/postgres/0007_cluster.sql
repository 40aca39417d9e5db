-- Several replicas: who holds which guest's tunnel (twin of ../sqlite/0007_cluster.sql).
CREATE TABLE cluster_replicas (
    replica_id     TEXT    COLLATE "C" PRIMARY KEY,
    advertise_url  TEXT    NOT NULL,
    started_at     BIGINT  NOT NULL,
    heartbeat_at   BIGINT  NOT NULL
);

CREATE TABLE cluster_tunnels (
    guest_id     TEXT    COLLATE "C" PRIMARY KEY,
    replica_id   TEXT    COLLATE "C" NOT NULL,
    epoch        BIGINT  NOT NULL,
    since        BIGINT  NOT NULL
);

CREATE INDEX cluster_tunnels_by_replica ON cluster_tunnels (replica_id);
