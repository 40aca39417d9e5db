-- Rotation: rollouts of a resource version to the guests a label selector picks, their
-- per-guest delivery state, and the guests rotation has seen (so a rollout also targets
-- matching guests that are offline when it starts).
CREATE TABLE rollouts (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    path              TEXT    NOT NULL,
    version           INTEGER NOT NULL,
    sha256            TEXT    NOT NULL,
    selector          TEXT    NOT NULL,
    max_concurrent    INTEGER NOT NULL,
    max_attempts      INTEGER NOT NULL,
    guest_deadline_ms INTEGER NOT NULL,
    deadline_at       INTEGER,
    state             TEXT    NOT NULL,
    detail            TEXT    NOT NULL DEFAULT '',
    superseded_by     INTEGER,
    created_at        INTEGER NOT NULL,
    created_by        TEXT    NOT NULL,
    updated_at        INTEGER NOT NULL,
    finished_at       INTEGER
);
CREATE INDEX rollouts_path ON rollouts (path, id);
CREATE INDEX rollouts_state ON rollouts (state, id);

CREATE TABLE rollout_targets (
    rollout_id      INTEGER NOT NULL REFERENCES rollouts (id),
    guest_id        TEXT    NOT NULL,
    state           TEXT    NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    reason          TEXT    NOT NULL DEFAULT '',
    digest          TEXT,
    held_version    INTEGER,
    hook_status     INTEGER,
    already_held    INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL DEFAULT 0,
    updated_at      INTEGER NOT NULL,
    acked_at        INTEGER,
    PRIMARY KEY (rollout_id, guest_id)
) WITHOUT ROWID;
CREATE INDEX rollout_targets_state ON rollout_targets (rollout_id, state, guest_id);

CREATE TABLE rotation_guests (
    guest_id  TEXT    PRIMARY KEY,
    labels    TEXT    NOT NULL,
    last_seen INTEGER NOT NULL
) WITHOUT ROWID;
