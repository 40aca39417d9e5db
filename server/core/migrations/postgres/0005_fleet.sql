-- Every guest the KBS has known (twin of ../sqlite/0005_fleet.sql).
CREATE TABLE fleet_guests (
    guest_id    TEXT    COLLATE "C" PRIMARY KEY,
    record      TEXT    NOT NULL,
    updated_at  BIGINT  NOT NULL
);
