-- Observability: every guest the KBS has known (connected or not). The KBS keeps the whole
-- fleet in an in-memory index for queries and writes changed records here behind it; a row
-- is the record's JSON (identity, labels, TEE, attestation and token times, first/last seen,
-- the last connections, the last probe and the held resource versions).
CREATE TABLE fleet_guests (
    guest_id    TEXT    PRIMARY KEY,
    record      TEXT    NOT NULL,
    updated_at  INTEGER NOT NULL
);
