-- Team plans (see gateway/plans.py): the allowance part of a balance, the plans,
-- and their ledger rows (refill, expire), one per team, environment, period and kind.
ALTER TABLE balances ADD COLUMN allowance INTEGER NOT NULL DEFAULT 0 CHECK (allowance >= 0);
CREATE TABLE plans (
    team_id TEXT NOT NULL REFERENCES teams(id),
    environment TEXT NOT NULL CHECK (environment IN ('live', 'test')),
    allowance INTEGER NOT NULL CHECK (allowance > 0),
    period TEXT NOT NULL CHECK (period IN ('day', 'week', 'month')),
    anchor_day INTEGER NOT NULL,
    rollover TEXT NOT NULL CHECK (rollover IN ('expire', 'carry')),
    max_balance INTEGER,
    current_period TEXT,
    updated_at REAL NOT NULL,
    PRIMARY KEY (team_id, environment)
);
CREATE TABLE plan_entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    team_id TEXT NOT NULL REFERENCES teams(id),
    environment TEXT NOT NULL CHECK (environment IN ('live', 'test')),
    period_key TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('refill', 'expire')),
    amount INTEGER NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (team_id, environment, period_key, kind)
);
-- Spending takes from the allowance first: every decrease of the total lowers
-- the allowance part too, unless the statement set the part itself. The WHEN
-- keeps it free for accounts without allowance (every team without a plan).
CREATE TRIGGER balances_spend_allowance_first
AFTER UPDATE OF available ON balances
WHEN OLD.allowance > 0 AND NEW.available < OLD.available AND NEW.allowance = OLD.allowance
BEGIN
    UPDATE balances
    SET allowance = MIN(NEW.available, MAX(0, OLD.allowance - (OLD.available - NEW.available)))
    WHERE team_id = NEW.team_id AND environment = NEW.environment; END
