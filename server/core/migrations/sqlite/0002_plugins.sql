-- Plugin enable/disable state, set by `POST /kbs/v0/plugin/{enable,disable}/<name>` and
-- restored at start. A plugin with no row takes its default (`[plugins] disabled`).
CREATE TABLE plugin_state (
    name        TEXT    PRIMARY KEY NOT NULL,
    enabled     INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    updated_by  TEXT    NOT NULL
);
