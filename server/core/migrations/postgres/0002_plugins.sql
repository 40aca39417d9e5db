-- Plugin enable/disable state (twin of ../sqlite/0002_plugins.sql).
CREATE TABLE plugin_state (
    name        TEXT    COLLATE "C" PRIMARY KEY NOT NULL,
    enabled     BIGINT  NOT NULL,
    updated_at  BIGINT  NOT NULL,
    updated_by  TEXT    NOT NULL
);
