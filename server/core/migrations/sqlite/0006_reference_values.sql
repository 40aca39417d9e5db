-- Reference values the appraisal policy reads as `data.reference` (name -> accepted values),
-- set by `PUT /kbs/v0/admin/reference-values/<name>`. The appraisal policy itself is a row of
-- `policies` (name `appraisal`).
CREATE TABLE reference_values (
    name        TEXT    PRIMARY KEY NOT NULL,
    vals        TEXT    NOT NULL,   -- JSON array of strings
    updated_at  INTEGER NOT NULL,
    updated_by  TEXT    NOT NULL
);
