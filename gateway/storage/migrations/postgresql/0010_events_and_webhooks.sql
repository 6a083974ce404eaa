-- See SQLite version 8: events (the outbox), webhook endpoints, deliveries and
-- their attempts, and the balance alerts that write credits.low / .exhausted.
CREATE TABLE events (
    id text COLLATE "C" PRIMARY KEY,
    type text NOT NULL,
    team_id text COLLATE "C" NOT NULL REFERENCES teams (id),
    data jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    dedupe_key text UNIQUE,
    dispatched boolean NOT NULL DEFAULT false
);
CREATE INDEX events_new ON events (created_at) WHERE NOT dispatched;
CREATE INDEX events_by_age ON events (created_at);

CREATE TABLE webhook_endpoints (
    id text COLLATE "C" PRIMARY KEY,
    team_id text COLLATE "C" NOT NULL REFERENCES teams (id),
    url text NOT NULL,
    description text NOT NULL,
    events text[] NOT NULL,
    enabled boolean NOT NULL DEFAULT true,
    secret text NOT NULL,
    previous_secret text,
    previous_secret_until timestamptz,
    failing_since timestamptz,
    disabled_reason text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_endpoints_team ON webhook_endpoints (team_id, created_at);

CREATE TABLE webhook_deliveries (
    id text COLLATE "C" PRIMARY KEY,
    event_id text COLLATE "C" NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    endpoint_id text COLLATE "C" NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    state text NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (event_id, endpoint_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id);

CREATE TABLE webhook_attempts (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id text COLLATE "C" NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    endpoint_id text COLLATE "C" NOT NULL,
    at timestamptz NOT NULL,
    status integer,
    latency_ms real NOT NULL,
    error text
);
CREATE INDEX webhook_attempts_endpoint ON webhook_attempts (endpoint_id, id);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id);

ALTER TABLE balances ADD COLUMN low_threshold bigint;
ALTER TABLE balances ADD COLUMN low_armed boolean NOT NULL DEFAULT true;
ALTER TABLE balances ADD COLUMN empty_armed boolean NOT NULL DEFAULT true;

-- Each alert fires once, then waits for a grant or a refill to arm it again.
-- The trigger's WHEN is checked without calling the function: spending that
-- crosses nothing pays nothing.
CREATE FUNCTION gateway_credit_alerts() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.low_armed AND NEW.low_threshold IS NOT NULL
       AND NEW.available < NEW.low_threshold AND OLD.available >= NEW.low_threshold THEN
        INSERT INTO events (id, type, team_id, data) VALUES (
            'evt_' || substr(md5(gen_random_uuid()::text), 1, 24), 'credits.low', NEW.team_id,
            jsonb_build_object('team_id', NEW.team_id, 'environment', NEW.environment,
                               'credits_available', NEW.available,
                               'threshold', NEW.low_threshold));
        NEW.low_armed := false;
    END IF;
    IF NEW.empty_armed AND NEW.available = 0 AND OLD.available > 0 THEN
        INSERT INTO events (id, type, team_id, data) VALUES (
            'evt_' || substr(md5(gen_random_uuid()::text), 1, 24), 'credits.exhausted',
            NEW.team_id,
            jsonb_build_object('team_id', NEW.team_id, 'environment', NEW.environment,
                               'credits_available', 0));
        NEW.empty_armed := false;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER balances_credit_alerts
BEFORE UPDATE OF available ON balances
FOR EACH ROW
WHEN ((NEW.low_armed AND NEW.available < NEW.low_threshold
       AND OLD.available >= NEW.low_threshold)
      OR (NEW.empty_armed AND NEW.available = 0 AND OLD.available > 0))
EXECUTE FUNCTION gateway_credit_alerts();

CREATE FUNCTION gateway_arm_credit_alerts() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE balances SET low_armed = true, empty_armed = true
    WHERE team_id = NEW.team_id AND environment = NEW.environment
      AND NOT (low_armed AND empty_armed);
    RETURN NULL;
END
$$;

CREATE TRIGGER credit_entries_arm_alerts
AFTER INSERT ON credit_entries
FOR EACH ROW WHEN (NEW.amount > 0)
EXECUTE FUNCTION gateway_arm_credit_alerts();

CREATE TRIGGER plan_entries_arm_alerts
AFTER INSERT ON plan_entries
FOR EACH ROW WHEN (NEW.kind = 'refill' AND NEW.amount > 0)
EXECUTE FUNCTION gateway_arm_credit_alerts();
