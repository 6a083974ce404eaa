CREATE TABLE teams (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    rate_limit_per_minute INTEGER,
    created_at REAL NOT NULL
);
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    team_id TEXT NOT NULL REFERENCES teams(id),
    name TEXT NOT NULL,
    prefix TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    environment TEXT NOT NULL CHECK (environment IN ('live', 'test')),
    rate_limit_per_minute INTEGER,
    disabled INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    last_used_at REAL,
    expires_at REAL,
    revoked_at REAL
);
CREATE INDEX api_keys_team ON api_keys (team_id, id);
CREATE TABLE key_changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key_hash TEXT,
    team_id TEXT,
    changed_at REAL NOT NULL
);
CREATE TABLE balances (
    team_id TEXT NOT NULL REFERENCES teams(id),
    environment TEXT NOT NULL CHECK (environment IN ('live', 'test')),
    available INTEGER NOT NULL CHECK (available >= 0),
    PRIMARY KEY (team_id, environment)
);
CREATE TABLE credit_entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    team_id TEXT NOT NULL REFERENCES teams(id),
    environment TEXT NOT NULL CHECK (environment IN ('live', 'test')),
    kind TEXT NOT NULL CHECK (kind IN ('grant', 'adjust')),
    amount INTEGER NOT NULL,
    reason TEXT NOT NULL,
    actor TEXT NOT NULL,
    idempotency_key TEXT,
    created_at REAL NOT NULL,
    UNIQUE (team_id, idempotency_key)
);
CREATE TABLE reservations (
    id TEXT PRIMARY KEY,
    team_id TEXT NOT NULL,
    environment TEXT NOT NULL,
    key_id TEXT NOT NULL,
    amount INTEGER NOT NULL CHECK (amount > 0),
    created_at REAL NOT NULL,
    lease_deadline REAL NOT NULL,
    resolution TEXT CHECK (resolution IN ('post', 'void', 'expire_void', 'expire_post')),
    charged INTEGER CHECK (charged >= 0 AND charged <= amount),
    resolved_at REAL
);
CREATE INDEX reservations_pending ON reservations (lease_deadline) WHERE resolution IS NULL;
CREATE INDEX reservations_team ON reservations (team_id, environment)
