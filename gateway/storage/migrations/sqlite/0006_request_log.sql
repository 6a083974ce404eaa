-- The request log: one row per request that reached authentication with a
-- known key, written in batches off the request path, searched newest first
-- within one team. Times are epoch seconds; (at, id) orders rows and pages.
CREATE TABLE request_log (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    team_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    key_prefix TEXT NOT NULL,
    environment TEXT NOT NULL,
    request_id TEXT NOT NULL,
    method TEXT NOT NULL,
    route TEXT NOT NULL,
    path TEXT NOT NULL,
    status INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    credits INTEGER NOT NULL,
    client_ip TEXT NOT NULL,
    user_agent TEXT NOT NULL,
    duration_ms REAL NOT NULL
);
CREATE INDEX request_log_by_team ON request_log (team_id, at, id);
CREATE INDEX request_log_by_key ON request_log (team_id, key_id, at, id);
CREATE INDEX request_log_by_status ON request_log (team_id, status, at, id);
CREATE INDEX request_log_by_age ON request_log (at);
