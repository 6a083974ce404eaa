-- Events and webhooks (see gateway/storage/events.py). Times are epoch seconds.
-- events is the outbox: written in the transaction of the change it tells of.
CREATE TABLE events (
    id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    team_id TEXT NOT NULL REFERENCES teams(id),
    data TEXT NOT NULL,
    created_at REAL NOT NULL,
    dedupe_key TEXT UNIQUE,
    dispatched INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX events_new ON events (created_at) WHERE dispatched = 0;
CREATE INDEX events_by_age ON events (created_at);
CREATE TABLE webhook_endpoints (
    id TEXT PRIMARY KEY,
    team_id TEXT NOT NULL REFERENCES teams(id),
    url TEXT NOT NULL,
    description TEXT NOT NULL,
    events TEXT NOT NULL,
    enabled INTEGER NOT NULL DEFAULT 1,
    secret TEXT NOT NULL,
    previous_secret TEXT,
    previous_secret_until REAL,
    failing_since REAL,
    disabled_reason TEXT,
    created_at REAL NOT NULL
);
CREATE INDEX webhook_endpoints_team ON webhook_endpoints (team_id, created_at);
CREATE TABLE webhook_deliveries (
    id TEXT PRIMARY KEY,
    event_id TEXT NOT NULL REFERENCES events(id) ON DELETE CASCADE,
    endpoint_id TEXT NOT NULL REFERENCES webhook_endpoints(id) ON DELETE CASCADE,
    state TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,
    created_at REAL NOT NULL,
    UNIQUE (event_id, endpoint_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id);
CREATE TABLE webhook_attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    delivery_id TEXT NOT NULL REFERENCES webhook_deliveries(id) ON DELETE CASCADE,
    endpoint_id TEXT NOT NULL,
    at REAL NOT NULL,
    status INTEGER,
    latency_ms REAL NOT NULL,
    error TEXT
);
CREATE INDEX webhook_attempts_endpoint ON webhook_attempts (endpoint_id, id);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id);
-- Balance alerts: credits.low fires when the balance falls below the threshold
-- and credits.exhausted when it reaches zero, each once until a grant or a
-- refill arms it again (a balance hovering around the line, spending and being
-- refunded, tells nothing twice). The WHENs keep spending free of any cost.
-- (A statement inside a trigger ends with "; " on its line: the migration
-- runner splits statements at a semicolon that ends a line.)
ALTER TABLE balances ADD COLUMN low_threshold INTEGER;
ALTER TABLE balances ADD COLUMN low_armed INTEGER NOT NULL DEFAULT 1;
ALTER TABLE balances ADD COLUMN empty_armed INTEGER NOT NULL DEFAULT 1;
CREATE TRIGGER balances_credits_low
AFTER UPDATE OF available ON balances
WHEN NEW.low_armed = 1 AND NEW.low_threshold IS NOT NULL
     AND NEW.available < NEW.low_threshold AND OLD.available >= NEW.low_threshold
BEGIN
    INSERT INTO events (id, type, team_id, data, created_at) VALUES (
        'evt_' || lower(hex(randomblob(12))), 'credits.low', NEW.team_id,
        json_object('team_id', NEW.team_id, 'environment', NEW.environment,
                    'credits_available', NEW.available, 'threshold', NEW.low_threshold),
        (julianday('now') - 2440587.5) * 86400.0); UPDATE balances SET low_armed = 0
    WHERE team_id = NEW.team_id AND environment = NEW.environment; END;
CREATE TRIGGER balances_credits_exhausted
AFTER UPDATE OF available ON balances
WHEN NEW.empty_armed = 1 AND NEW.available = 0 AND OLD.available > 0
BEGIN
    INSERT INTO events (id, type, team_id, data, created_at) VALUES (
        'evt_' || lower(hex(randomblob(12))), 'credits.exhausted', NEW.team_id,
        json_object('team_id', NEW.team_id, 'environment', NEW.environment,
                    'credits_available', 0),
        (julianday('now') - 2440587.5) * 86400.0); UPDATE balances SET empty_armed = 0
    WHERE team_id = NEW.team_id AND environment = NEW.environment; END;
CREATE TRIGGER credit_entries_arm_alerts
AFTER INSERT ON credit_entries
WHEN NEW.amount > 0
BEGIN
    UPDATE balances SET low_armed = 1, empty_armed = 1
    WHERE team_id = NEW.team_id AND environment = NEW.environment; END;
CREATE TRIGGER plan_entries_arm_alerts
AFTER INSERT ON plan_entries
WHEN NEW.kind = 'refill' AND NEW.amount > 0
BEGIN
    UPDATE balances SET low_armed = 1, empty_armed = 1
    WHERE team_id = NEW.team_id AND environment = NEW.environment; END
