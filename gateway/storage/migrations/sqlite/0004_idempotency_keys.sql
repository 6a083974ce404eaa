-- Idempotency-Key records, one per (team, environment, key). A rowid
-- table: a row may hold a response body of up to the replay cap.
CREATE TABLE idempotency_keys (
    team_id TEXT NOT NULL,
    environment TEXT NOT NULL CHECK (environment IN ('live', 'test')),
    idempotency_key TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('in_flight', 'completed')),
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    reservation_id TEXT,
    body_hash TEXT,
    status INTEGER,
    content_type TEXT,
    body BLOB,
    body_stored INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    completed_at REAL,
    UNIQUE (team_id, environment, idempotency_key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at)
