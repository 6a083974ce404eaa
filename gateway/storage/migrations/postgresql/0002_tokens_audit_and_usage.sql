CREATE TABLE team_tokens (
    id text COLLATE "C" PRIMARY KEY,
    team_id text COLLATE "C" NOT NULL REFERENCES teams (id),
    name text NOT NULL,
    prefix text NOT NULL,
    token_hash text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at timestamptz
);
CREATE INDEX team_tokens_team ON team_tokens (team_id, id);

-- Who changed what through the admin API. Append-only: the triggers refuse
-- every UPDATE, DELETE and TRUNCATE (a later migration may add retention).
CREATE TABLE audit_log (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    actor text NOT NULL,
    action text NOT NULL,
    target text,
    team_id text COLLATE "C",
    client_ip text,
    details jsonb NOT NULL
);
CREATE INDEX audit_log_team ON audit_log (team_id, id);

CREATE FUNCTION gateway_audit_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only';
END
$$;

CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_log
FOR EACH STATEMENT EXECUTE FUNCTION gateway_audit_append_only();

-- Per-minute counters, added to by every gateway process's flush (upserts
-- that add, so concurrent writers lose nothing). Minutes and days are epoch
-- seconds, as on SQLite; the counters are all that changes, so leave room for
-- HOT updates.
CREATE TABLE usage_minutes (
    team_id text COLLATE "C" NOT NULL,
    minute bigint NOT NULL,
    key_id text COLLATE "C" NOT NULL,
    environment text NOT NULL CHECK (environment IN ('live', 'test')),
    outcome text COLLATE "C" NOT NULL,
    requests bigint NOT NULL,
    credits bigint NOT NULL,
    PRIMARY KEY (team_id, minute, key_id, environment, outcome)
) WITH (fillfactor = 80);

CREATE TABLE key_ip_days (
    team_id text COLLATE "C" NOT NULL,
    key_id text COLLATE "C" NOT NULL,
    day bigint NOT NULL,
    client_ip text COLLATE "C" NOT NULL,
    requests bigint NOT NULL,
    PRIMARY KEY (team_id, key_id, day, client_ip)
) WITH (fillfactor = 80);
CREATE INDEX key_ip_days_day ON key_ip_days (day);

CREATE TABLE auth_failure_minutes (
    minute bigint NOT NULL,
    key_prefix text COLLATE "C" NOT NULL,
    client_ip text COLLATE "C" NOT NULL,
    reason text COLLATE "C" NOT NULL,
    failures bigint NOT NULL,
    PRIMARY KEY (minute, key_prefix, client_ip, reason)
) WITH (fillfactor = 80);

-- The ledger history pages by (created_at, id) per team.
CREATE INDEX credit_entries_team_time ON credit_entries (team_id, created_at, id);
CREATE INDEX reservations_team_time ON reservations (team_id, created_at, id);
