-- Reference values of the appraisal policy (twin of ../sqlite/0006_reference_values.sql).
CREATE TABLE reference_values (
    name        TEXT    COLLATE "C" PRIMARY KEY NOT NULL,
    vals        TEXT    NOT NULL,   -- JSON array of strings
    updated_at  BIGINT  NOT NULL,
    updated_by  TEXT    NOT NULL
);
