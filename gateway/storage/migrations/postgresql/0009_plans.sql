-- Team plans (see gateway/plans.py): the allowance part of a balance, the plans,
-- and their ledger rows (refill, expire), one per team, environment, period and kind.
ALTER TABLE balances ADD COLUMN allowance bigint NOT NULL DEFAULT 0 CHECK (allowance >= 0);

CREATE TABLE plans (
    team_id text COLLATE "C" NOT NULL REFERENCES teams (id),
    environment text NOT NULL CHECK (environment IN ('live', 'test')),
    allowance bigint NOT NULL CHECK (allowance > 0),
    period text NOT NULL CHECK (period IN ('day', 'week', 'month')),
    anchor_day integer NOT NULL,
    rollover text NOT NULL CHECK (rollover IN ('expire', 'carry')),
    max_balance bigint,
    current_period text,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (team_id, environment)
);

CREATE TABLE plan_entries (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    team_id text COLLATE "C" NOT NULL REFERENCES teams (id),
    environment text NOT NULL CHECK (environment IN ('live', 'test')),
    period_key text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('refill', 'expire')),
    amount bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (team_id, environment, period_key, kind)
);

-- Spending takes from the allowance first: every decrease of the total lowers
-- the allowance part too, unless the statement set the part itself. The WHEN
-- is checked without calling the function, so accounts without allowance
-- (every team without a plan) pay nothing on the reserve path.
CREATE FUNCTION gateway_spend_allowance_first() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.allowance := LEAST(NEW.available,
                           GREATEST(0, OLD.allowance - (OLD.available - NEW.available)));
    RETURN NEW;
END
$$;

CREATE TRIGGER balances_spend_allowance_first
BEFORE UPDATE OF available ON balances
FOR EACH ROW
WHEN (OLD.allowance > 0 AND NEW.available < OLD.available AND NEW.allowance = OLD.allowance)
EXECUTE FUNCTION gateway_spend_allowance_first();
