-- Per-key spend caps and calendar request quotas (see gateway/caps.py).
ALTER TABLE api_keys ADD COLUMN credit_cap_per_day INTEGER CHECK (credit_cap_per_day > 0);
ALTER TABLE api_keys ADD COLUMN credit_cap_per_month INTEGER CHECK (credit_cap_per_month > 0);
ALTER TABLE api_keys ADD COLUMN quota_per_day INTEGER CHECK (quota_per_day > 0);
ALTER TABLE api_keys ADD COLUMN quota_per_month INTEGER CHECK (quota_per_month > 0);
ALTER TABLE teams ADD COLUMN quota_per_day INTEGER CHECK (quota_per_day > 0);
ALTER TABLE teams ADD COLUMN quota_per_month INTEGER CHECK (quota_per_month > 0);
-- The periods a capped reservation counted against (NULL for uncapped keys).
ALTER TABLE reservations ADD COLUMN cap_day TEXT;
ALTER TABLE reservations ADD COLUMN cap_month TEXT;
-- What each capped key has spent per period: the sum of its reservations of the
-- period (held while pending, charged once resolved).
CREATE TABLE key_spend (
    key_id TEXT NOT NULL,
    period_key TEXT NOT NULL,
    spent INTEGER NOT NULL CHECK (spent >= 0),
    PRIMARY KEY (key_id, period_key)
) WITHOUT ROWID;
-- Calendar request quotas counted by the store (no Redis limiter configured).
CREATE TABLE quota_counts (
    subject TEXT NOT NULL,
    period_key TEXT NOT NULL,
    used INTEGER NOT NULL CHECK (used >= 0),
    expires_at REAL NOT NULL,
    PRIMARY KEY (subject, period_key)
) WITHOUT ROWID;
CREATE INDEX quota_counts_expires_at ON quota_counts (expires_at);
-- Whichever path resolves a capped reservation (post, void, lease expiry), the
-- part not charged goes back to its key's spend in the same transaction.
CREATE TRIGGER reservations_refund_key_spend
AFTER UPDATE OF resolution ON reservations
WHEN OLD.resolution IS NULL AND NEW.resolution IS NOT NULL
     AND (NEW.cap_day IS NOT NULL OR NEW.cap_month IS NOT NULL) AND NEW.charged < NEW.amount
BEGIN
    UPDATE key_spend SET spent = spent - (NEW.amount - NEW.charged)
    WHERE key_id = NEW.key_id AND period_key IN (NEW.cap_day, NEW.cap_month); END;
