-- Observability: one event log for tunnel connects/disconnects (with close codes), admin
-- actions, policy changes and rollout actions. Written in batches off the request path.
CREATE TABLE events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          INTEGER NOT NULL,           -- Unix ms
    kind        TEXT    NOT NULL,           -- connect, disconnect, admin, policy, rollout, probe
    action      TEXT    NOT NULL,           -- e.g. tunnel.connect, resource.put, policy.set
    guest_id    TEXT,
    actor       TEXT,
    target      TEXT    NOT NULL,
    outcome     TEXT    NOT NULL,
    detail      TEXT    NOT NULL
);
CREATE INDEX events_kind ON events (kind, id);
CREATE INDEX events_guest ON events (guest_id, id) WHERE guest_id IS NOT NULL;
CREATE INDEX events_actor ON events (actor, id) WHERE actor IS NOT NULL;
CREATE INDEX events_at ON events (at);
