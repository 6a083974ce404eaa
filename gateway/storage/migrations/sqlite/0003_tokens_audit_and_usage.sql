CREATE TABLE team_tokens (
    id TEXT PRIMARY KEY,
    team_id TEXT NOT NULL REFERENCES teams(id),
    name TEXT NOT NULL,
    prefix TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    last_used_at REAL,
    revoked_at REAL
);
CREATE INDEX team_tokens_team ON team_tokens (team_id, id);
CREATE TABLE audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT,
    team_id TEXT,
    client_ip TEXT,
    details TEXT NOT NULL
);
CREATE INDEX audit_log_team ON audit_log (team_id, id);
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TABLE usage_minutes (
    team_id TEXT NOT NULL,
    minute INTEGER NOT NULL,
    key_id TEXT NOT NULL,
    environment TEXT NOT NULL CHECK (environment IN ('live', 'test')),
    outcome TEXT NOT NULL,
    requests INTEGER NOT NULL,
    credits INTEGER NOT NULL,
    PRIMARY KEY (team_id, minute, key_id, environment, outcome)
) WITHOUT ROWID;
CREATE TABLE key_ip_days (
    team_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    day INTEGER NOT NULL,
    client_ip TEXT NOT NULL,
    requests INTEGER NOT NULL,
    PRIMARY KEY (team_id, key_id, day, client_ip)
) WITHOUT ROWID;
CREATE INDEX key_ip_days_day ON key_ip_days (day);
CREATE TABLE auth_failure_minutes (
    minute INTEGER NOT NULL,
    key_prefix TEXT NOT NULL,
    client_ip TEXT NOT NULL,
    reason TEXT NOT NULL,
    failures INTEGER NOT NULL,
    PRIMARY KEY (minute, key_prefix, client_ip, reason)
) WITHOUT ROWID;
CREATE INDEX credit_entries_team_time ON credit_entries (team_id, created_at, id);
CREATE INDEX reservations_team_time ON reservations (team_id, created_at, id)
