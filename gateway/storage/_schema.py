"""Versioned schema migrations. A version, once released, is never edited: add a new one."""

from __future__ import annotations

__all__ = ["POSTGRES_MIGRATIONS", "SQLITE_MIGRATIONS"]

SQLITE_MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
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
""",
    ),
    (
        2,
        """
CREATE TABLE reservation_rollups (
    team_id TEXT NOT NULL,
    environment TEXT NOT NULL CHECK (environment IN ('live', 'test')),
    day TEXT NOT NULL,
    reservations INTEGER NOT NULL,
    reserved INTEGER NOT NULL,
    charged INTEGER NOT NULL,
    PRIMARY KEY (team_id, environment, day)
);
CREATE INDEX reservations_resolved ON reservations (resolved_at) WHERE resolution IS NOT NULL
""",
    ),
    (
        3,
        """
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
""",
    ),
    (
        4,
        # Idempotency-Key records, one per (team, environment, key). A rowid
        # table: a row may hold a response body of up to the replay cap.
        """
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
""",
    ),
    (
        5,
        """
-- A grant's Idempotency-Key remembers what was asked (a hash of environment,
-- amount and reason) and what was answered (the balance right after it), so a
-- replay answers the first answer and a different request under the key is told apart.
ALTER TABLE credit_entries ADD COLUMN request_hash TEXT;
ALTER TABLE credit_entries ADD COLUMN balance_after INTEGER;
""",
    ),
]

# PostgreSQL keeps times as timestamptz (the backend hands them out as epoch
# seconds) and ids in the "C" collation, so that cursors page in the same byte
# order as on SQLite. The ledger's writes are functions: a batch is one
# statement, hence one round trip, whatever its size.
POSTGRES_MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        r"""
CREATE TABLE teams (
    id text COLLATE "C" PRIMARY KEY,
    name text NOT NULL UNIQUE,
    rate_limit_per_minute integer,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id text COLLATE "C" PRIMARY KEY,
    team_id text COLLATE "C" NOT NULL REFERENCES teams (id),
    name text NOT NULL,
    prefix text NOT NULL,
    key_hash text NOT NULL UNIQUE,
    environment text NOT NULL CHECK (environment IN ('live', 'test')),
    rate_limit_per_minute integer,
    disabled boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    expires_at timestamptz,
    revoked_at timestamptz
);
CREATE INDEX api_keys_team ON api_keys (team_id, id);

-- One counter row instead of a sequence: a writer holds it until commit, so
-- change numbers become visible in order and a reader that has seen N has seen
-- everything before N (sequence values can commit out of order).
CREATE TABLE key_change_counter (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    seq bigint NOT NULL
);
INSERT INTO key_change_counter (seq) VALUES (0);

CREATE TABLE key_changes (
    seq bigint PRIMARY KEY,
    key_hash text,
    team_id text COLLATE "C",
    changed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX key_changes_changed_at ON key_changes (changed_at);

-- Every request of a team updates its row: leave room on the page so that
-- the updates stay HOT (no index writes, pruned in place).
CREATE TABLE balances (
    team_id text COLLATE "C" NOT NULL REFERENCES teams (id),
    environment text NOT NULL CHECK (environment IN ('live', 'test')),
    available bigint NOT NULL CHECK (available >= 0),
    PRIMARY KEY (team_id, environment)
) WITH (fillfactor = 50);

CREATE TABLE credit_entries (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    team_id text COLLATE "C" NOT NULL REFERENCES teams (id),
    environment text NOT NULL CHECK (environment IN ('live', 'test')),
    kind text NOT NULL CHECK (kind IN ('grant', 'adjust')),
    amount bigint NOT NULL,
    reason text NOT NULL,
    actor text NOT NULL,
    idempotency_key text,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (team_id, idempotency_key)
);
CREATE INDEX credit_entries_team ON credit_entries (team_id, id);

CREATE TABLE reservations (
    id text COLLATE "C" PRIMARY KEY,
    team_id text COLLATE "C" NOT NULL,
    environment text NOT NULL CHECK (environment IN ('live', 'test')),
    key_id text NOT NULL,
    amount integer NOT NULL CHECK (amount > 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    lease_deadline timestamptz NOT NULL,
    resolution text CHECK (resolution IN ('post', 'void', 'expire_void', 'expire_post')),
    charged integer CHECK (charged >= 0 AND charged <= amount),
    resolved_at timestamptz
);
CREATE INDEX reservations_pending ON reservations (lease_deadline) WHERE resolution IS NULL;
CREATE INDEX reservations_resolved ON reservations (resolved_at) WHERE resolution IS NOT NULL;

-- What retention removed from reservations, per day of reservation (UTC).
CREATE TABLE reservation_rollups (
    team_id text COLLATE "C" NOT NULL,
    environment text NOT NULL CHECK (environment IN ('live', 'test')),
    day date NOT NULL,
    reservations bigint NOT NULL,
    reserved bigint NOT NULL,
    charged bigint NOT NULL,
    PRIMARY KEY (team_id, environment, day)
);

-- Lock order, the same for every writer of the ledger so that batches never
-- deadlock: reservation rows before balance rows, each kind in "C" key order.

-- Greedy in request order, exactly like the SQLite backend: a request is
-- granted iff its account still holds its amount; an id reserved already (a
-- retry) is granted without taking anything again. Set-based around one loop
-- of plain arithmetic: the statements cost the same for 1 request or 500.
CREATE FUNCTION gateway_reserve(
    p_ids text[],
    p_team_ids text[],
    p_environments text[],
    p_key_ids text[],
    p_amounts integer[],
    p_lease_seconds double precision
) RETURNS TABLE (granted boolean, available bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_granted boolean[] := array_fill(false, ARRAY[cardinality(p_ids)]);
    v_available bigint[] := array_fill(0::bigint, ARRAY[cardinality(p_ids)]);
    v_teams text[];
    v_envs text[];
    v_have bigint[];
    v_had bigint[];
    v_existing text[];
    v_taken_dups text[] := '{}';
    v_new integer[] := '{}';
    v_inserted integer;
    v_req record;
BEGIN
    -- The accounts of the batch, in key order; their balance rows locked in
    -- that order (a missing row holds nothing, so nothing is taken from it).
    WITH wanted AS (
        SELECT DISTINCT u.team_id, u.environment
        FROM unnest(p_team_ids, p_environments) AS u (team_id, environment)
    ), locked AS (
        SELECT b.team_id, b.environment, b.available
        FROM balances b
        JOIN wanted w ON b.team_id = w.team_id AND b.environment = w.environment
        ORDER BY b.team_id COLLATE "C", b.environment COLLATE "C"
        FOR UPDATE OF b
    )
    SELECT array_agg(w.team_id ORDER BY w.team_id COLLATE "C", w.environment COLLATE "C"),
           array_agg(w.environment ORDER BY w.team_id COLLATE "C", w.environment COLLATE "C"),
           array_agg(coalesce(l.available, 0)
                     ORDER BY w.team_id COLLATE "C", w.environment COLLATE "C")
    INTO v_teams, v_envs, v_have
    FROM wanted w
    LEFT JOIN locked l ON l.team_id = w.team_id AND l.environment = w.environment;
    v_had := v_have;

    -- Read after the locks: a retry racing its first attempt has waited for it
    -- on the balance row, and sees its reservation here.
    SELECT coalesce(array_agg(r.id), '{}') INTO v_existing
    FROM reservations r WHERE r.id = ANY (p_ids);

    FOR v_req IN
        SELECT u.id, u.amount, u.ord::integer AS ord,
               dense_rank() OVER (ORDER BY u.team_id COLLATE "C", u.environment COLLATE "C")
                   ::integer AS account,
               count(*) OVER (PARTITION BY u.id) > 1 AS repeated
        FROM unnest(p_ids, p_team_ids, p_environments, p_amounts)
            WITH ORDINALITY AS u (id, team_id, environment, amount, ord)
        ORDER BY u.ord
    LOOP
        IF v_have[v_req.account] >= v_req.amount THEN
            v_granted[v_req.ord] := true;
            IF NOT (v_req.id = ANY (v_existing))
               AND NOT (v_req.repeated AND v_req.id = ANY (v_taken_dups)) THEN
                v_have[v_req.account] := v_have[v_req.account] - v_req.amount;
                v_new := v_new || v_req.ord;
                IF v_req.repeated THEN
                    v_taken_dups := v_taken_dups || v_req.id;
                END IF;
            END IF;
        END IF;
        v_available[v_req.ord] := v_have[v_req.account];
    END LOOP;

    IF cardinality(v_new) > 0 THEN
        INSERT INTO reservations
            (id, team_id, environment, key_id, amount, created_at, lease_deadline)
        SELECT p_ids[o], p_team_ids[o], p_environments[o], p_key_ids[o], p_amounts[o],
               now(), now() + p_lease_seconds * interval '1 second'
        FROM unnest(v_new) AS o
        ON CONFLICT (id) DO NOTHING;
        GET DIAGNOSTICS v_inserted = ROW_COUNT;
        IF v_inserted <> cardinality(v_new) THEN
            -- Only an id reused for another account, at the same moment, gets
            -- here. Never take credits for a reservation that was not written.
            RAISE EXCEPTION 'reservation id reserved concurrently for another account'
                USING ERRCODE = 'serialization_failure';
        END IF;
        UPDATE balances b SET available = a.have
        FROM unnest(v_teams, v_envs, v_have, v_had) AS a (team_id, environment, have, had)
        WHERE b.team_id = a.team_id AND b.environment = a.environment AND a.have <> a.had;
    END IF;
    RETURN QUERY
        SELECT x.g, x.a FROM unnest(v_granted, v_available) WITH ORDINALITY AS x (g, a, o)
        ORDER BY x.o;
END
$$;

-- Post or void: each pending reservation resolves once (a late or unknown id
-- changes nothing), the charge is capped at the amount reserved, and the rest
-- goes back to the balance in the same transaction. Returns how many applied.
CREATE FUNCTION gateway_resolve(p_ids text[], p_charged integer[], p_kind text)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_applied integer;
    v_teams text[];
    v_envs text[];
    v_refunds bigint[];
BEGIN
    PERFORM 1 FROM reservations r
    WHERE r.id = ANY (p_ids) AND r.resolution IS NULL
    ORDER BY r.id COLLATE "C"
    FOR UPDATE;

    WITH items AS (
        -- An id named twice in one batch: the first mention wins, as on SQLite.
        SELECT DISTINCT ON (u.id) u.id, u.charged
        FROM unnest(p_ids, p_charged) WITH ORDINALITY AS u (id, charged, ord)
        ORDER BY u.id, u.ord
    ), resolved AS (
        UPDATE reservations r
        SET resolution = p_kind,
            charged = least(greatest(coalesce(i.charged, 0), 0), r.amount),
            resolved_at = now()
        FROM items i
        WHERE r.id = i.id AND r.resolution IS NULL
        RETURNING r.team_id, r.environment, r.amount - r.charged AS refund
    ), per_account AS (
        SELECT s.team_id, s.environment, count(*) AS n, sum(s.refund) AS refund
        FROM resolved s GROUP BY s.team_id, s.environment
    )
    SELECT coalesce(sum(p.n), 0)::integer,
           array_agg(p.team_id) FILTER (WHERE p.refund > 0),
           array_agg(p.environment) FILTER (WHERE p.refund > 0),
           array_agg(p.refund) FILTER (WHERE p.refund > 0)
    INTO v_applied, v_teams, v_envs, v_refunds
    FROM per_account p;

    IF v_refunds IS NOT NULL THEN
        PERFORM 1 FROM balances b
        JOIN unnest(v_teams, v_envs) AS a (team_id, environment)
            ON b.team_id = a.team_id AND b.environment = a.environment
        ORDER BY b.team_id COLLATE "C", b.environment COLLATE "C"
        FOR UPDATE OF b;
        UPDATE balances b SET available = b.available + a.refund
        FROM unnest(v_teams, v_envs, v_refunds) AS a (team_id, environment, refund)
        WHERE b.team_id = a.team_id AND b.environment = a.environment;
    END IF;
    RETURN v_applied;
END
$$;

-- The sweeper. SKIP LOCKED: rows another replica's sweeper (or a post racing
-- the lease) holds are theirs to resolve; nobody waits, nothing resolves twice.
CREATE FUNCTION gateway_expire(p_policy text, p_limit integer)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_ids text[];
    v_charged integer[];
BEGIN
    SELECT array_agg(s.id), array_agg(CASE WHEN p_policy = 'post' THEN s.amount ELSE 0 END)
    INTO v_ids, v_charged
    FROM (
        SELECT r.id, r.amount FROM reservations r
        WHERE r.resolution IS NULL AND r.lease_deadline < now()
        ORDER BY r.lease_deadline
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ) s;
    IF v_ids IS NULL THEN
        RETURN 0;
    END IF;
    RETURN gateway_resolve(v_ids, v_charged, 'expire_' || p_policy);
END
$$;

-- Key changes are logged and announced by triggers, so every write of a key
-- or a team's limit (present or future, admin API or psql) is seen by every
-- key cache: the NOTIFY is delivered at commit, with the change itself.
CREATE FUNCTION gateway_log_key_change(p_key_hash text, p_team_id text)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_seq bigint;
BEGIN
    UPDATE key_change_counter SET seq = seq + 1 RETURNING seq INTO v_seq;
    INSERT INTO key_changes (seq, key_hash, team_id) VALUES (v_seq, p_key_hash, p_team_id);
    DELETE FROM key_changes
    WHERE changed_at < now() - interval '1 hour' AND seq < v_seq;
    PERFORM pg_notify(
        'gateway_key_changes',
        json_build_object('seq', v_seq, 'key_hash', p_key_hash, 'team_id', p_team_id)::text
    );
END
$$;

CREATE FUNCTION gateway_api_key_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM gateway_log_key_change(OLD.key_hash, NULL);
    END IF;
    IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND NEW.key_hash <> OLD.key_hash) THEN
        PERFORM gateway_log_key_change(NEW.key_hash, NULL);
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION gateway_team_limit_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM gateway_log_key_change(NULL, NEW.id);
    RETURN NULL;
END
$$;

-- Deferred to commit: the counter row is then the last lock a key-writing
-- transaction takes, so two of them (a rotation and an update of the same key,
-- say) can never wait for each other in a circle; and it is held only while
-- the transaction commits.

-- A new key may have been looked up (and cached as unknown) before it existed.
CREATE CONSTRAINT TRIGGER api_keys_added_or_removed AFTER INSERT OR DELETE ON api_keys
DEFERRABLE INITIALLY DEFERRED
FOR EACH ROW EXECUTE FUNCTION gateway_api_key_changed();

-- Only what authentication reads: last_used_at and the name change nothing cached.
CREATE CONSTRAINT TRIGGER api_keys_updated AFTER UPDATE ON api_keys
DEFERRABLE INITIALLY DEFERRED
FOR EACH ROW WHEN (
    (OLD.key_hash, OLD.team_id, OLD.environment, OLD.prefix, OLD.rate_limit_per_minute,
     OLD.disabled, OLD.expires_at, OLD.revoked_at)
    IS DISTINCT FROM
    (NEW.key_hash, NEW.team_id, NEW.environment, NEW.prefix, NEW.rate_limit_per_minute,
     NEW.disabled, NEW.expires_at, NEW.revoked_at)
) EXECUTE FUNCTION gateway_api_key_changed();

CREATE CONSTRAINT TRIGGER teams_limit_updated AFTER UPDATE OF rate_limit_per_minute ON teams
DEFERRABLE INITIALLY DEFERRED
FOR EACH ROW WHEN (OLD.rate_limit_per_minute IS DISTINCT FROM NEW.rate_limit_per_minute)
EXECUTE FUNCTION gateway_team_limit_changed();
""",
    ),
    (
        2,
        r"""
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
""",
    ),
    (
        3,
        r"""
-- Idempotency-Key records, one per (team, environment, key): in flight while
-- the first attempt runs, then its answer. A record older than 24 hours
-- (IDEMPOTENCY_TTL_SECONDS) counts as absent and may be overwritten.
-- Every claim of a key is made while the account's balance row is locked
-- (FOR UPDATE in gateway_reserve, FOR KEY SHARE in gateway_claim_idempotency;
-- the two conflict), so two first attempts never both win.
CREATE TABLE idempotency_keys (
    team_id text COLLATE "C" NOT NULL,
    environment text NOT NULL CHECK (environment IN ('live', 'test')),
    idempotency_key text COLLATE "C" NOT NULL,
    state text NOT NULL CHECK (state IN ('in_flight', 'completed')),
    method text NOT NULL,
    path text NOT NULL,
    reservation_id text COLLATE "C",
    body_hash text,
    status integer,
    content_type text,
    body bytea,
    body_stored boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    completed_at timestamptz,
    PRIMARY KEY (team_id, environment, idempotency_key)
);
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);

-- gateway_reserve of version 1 with the Idempotency-Key check folded in (still
-- one statement). p_idem_keys is NULL for a batch without claims, which then
-- does exactly what it did before; otherwise it names each request's key, or
-- NULL. A request whose key an unexpired record holds (an earlier attempt, or
-- an earlier request of this batch) reserves nothing and is answered with the
-- record; one granted under a free key records it as in flight. A retry of
-- the reservation id that made the record is no replay: it is a retried id.
CREATE FUNCTION gateway_reserve(
    p_ids text[],
    p_team_ids text[],
    p_environments text[],
    p_key_ids text[],
    p_amounts integer[],
    p_lease_seconds double precision,
    p_idem_keys text[],
    p_idem_methods text[],
    p_idem_paths text[]
) RETURNS TABLE (
    granted boolean,
    available bigint,
    replay_state text,
    replay_method text,
    replay_path text,
    replay_body_hash text,
    replay_status integer,
    replay_content_type text,
    replay_body bytea,
    replay_body_stored boolean
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_granted boolean[] := array_fill(false, ARRAY[cardinality(p_ids)]);
    v_available bigint[] := array_fill(0::bigint, ARRAY[cardinality(p_ids)]);
    v_teams text[];
    v_envs text[];
    v_have bigint[];
    v_had bigint[];
    v_existing text[];
    v_taken_dups text[] := '{}';
    v_new integer[] := '{}';
    v_inserted integer;
    v_req record;
    -- The keys held ("<account> <key>") and the reservation that made each;
    -- the requests answered with a replay; the claims this batch records.
    v_held text[] := '{}';
    v_held_by text[] := '{}';
    v_scope text;
    v_at integer;
    v_replays integer[] := '{}';
    v_claims integer[] := '{}';
BEGIN
    -- The accounts of the batch, in key order; their balance rows locked in
    -- that order (a missing row holds nothing, so nothing is taken from it).
    WITH wanted AS (
        SELECT DISTINCT u.team_id, u.environment
        FROM unnest(p_team_ids, p_environments) AS u (team_id, environment)
    ), locked AS (
        SELECT b.team_id, b.environment, b.available
        FROM balances b
        JOIN wanted w ON b.team_id = w.team_id AND b.environment = w.environment
        ORDER BY b.team_id COLLATE "C", b.environment COLLATE "C"
        FOR UPDATE OF b
    )
    SELECT array_agg(w.team_id ORDER BY w.team_id COLLATE "C", w.environment COLLATE "C"),
           array_agg(w.environment ORDER BY w.team_id COLLATE "C", w.environment COLLATE "C"),
           array_agg(coalesce(l.available, 0)
                     ORDER BY w.team_id COLLATE "C", w.environment COLLATE "C")
    INTO v_teams, v_envs, v_have
    FROM wanted w
    LEFT JOIN locked l ON l.team_id = w.team_id AND l.environment = w.environment;
    v_had := v_have;

    -- Read after the locks: a retry racing its first attempt has waited for it
    -- on the balance row, and sees its reservation here.
    SELECT coalesce(array_agg(r.id), '{}') INTO v_existing
    FROM reservations r WHERE r.id = ANY (p_ids);

    IF p_idem_keys IS NOT NULL THEN
        -- Also after the locks, for the same reason. The records read are
        -- locked too, so that none is released or completed away before the
        -- replay is returned below (a record completed meanwhile is re-read).
        SELECT coalesce(array_agg(h.scope), '{}'), coalesce(array_agg(h.reservation_id), '{}')
        INTO v_held, v_held_by
        FROM (
            SELECT a.account || ' ' || i.idempotency_key AS scope, i.reservation_id
            FROM (
                SELECT DISTINCT u.team_id, u.environment, u.idempotency_key
                FROM unnest(p_team_ids, p_environments, p_idem_keys)
                    AS u (team_id, environment, idempotency_key)
                WHERE u.idempotency_key IS NOT NULL
            ) c
            JOIN unnest(v_teams, v_envs) WITH ORDINALITY AS a (team_id, environment, account)
                ON a.team_id = c.team_id AND a.environment = c.environment
            JOIN idempotency_keys i
                ON i.team_id = c.team_id AND i.environment = c.environment
               AND i.idempotency_key = c.idempotency_key
            WHERE i.created_at > now() - interval '24 hours'
            FOR SHARE OF i
        ) h;
    END IF;

    -- Unnesting a NULL p_idem_keys pads the column with NULLs: no claims.
    FOR v_req IN
        SELECT u.id, u.amount, u.ord::integer AS ord,
               dense_rank() OVER (ORDER BY u.team_id COLLATE "C", u.environment COLLATE "C")
                   ::integer AS account,
               count(*) OVER (PARTITION BY u.id) > 1 AS repeated,
               u.idempotency_key
        FROM unnest(p_ids, p_team_ids, p_environments, p_amounts, p_idem_keys)
            WITH ORDINALITY AS u (id, team_id, environment, amount, idempotency_key, ord)
        ORDER BY u.ord
    LOOP
        IF v_req.idempotency_key IS NOT NULL THEN
            v_scope := v_req.account || ' ' || v_req.idempotency_key;
            v_at := array_position(v_held, v_scope);
            IF v_at IS NOT NULL AND v_held_by[v_at] IS DISTINCT FROM v_req.id THEN
                v_replays := v_replays || v_req.ord;
                v_available[v_req.ord] := v_have[v_req.account];
                CONTINUE;
            END IF;
        END IF;
        IF v_have[v_req.account] >= v_req.amount THEN
            v_granted[v_req.ord] := true;
            IF NOT (v_req.id = ANY (v_existing))
               AND NOT (v_req.repeated AND v_req.id = ANY (v_taken_dups)) THEN
                v_have[v_req.account] := v_have[v_req.account] - v_req.amount;
                v_new := v_new || v_req.ord;
                IF v_req.repeated THEN
                    v_taken_dups := v_taken_dups || v_req.id;
                END IF;
            END IF;
            IF v_req.idempotency_key IS NOT NULL AND v_at IS NULL THEN
                v_held := v_held || v_scope;
                v_held_by := v_held_by || v_req.id;
                v_claims := v_claims || v_req.ord;
            END IF;
        END IF;
        v_available[v_req.ord] := v_have[v_req.account];
    END LOOP;

    IF cardinality(v_new) > 0 THEN
        INSERT INTO reservations
            (id, team_id, environment, key_id, amount, created_at, lease_deadline)
        SELECT p_ids[o], p_team_ids[o], p_environments[o], p_key_ids[o], p_amounts[o],
               now(), now() + p_lease_seconds * interval '1 second'
        FROM unnest(v_new) AS o
        ON CONFLICT (id) DO NOTHING;
        GET DIAGNOSTICS v_inserted = ROW_COUNT;
        IF v_inserted <> cardinality(v_new) THEN
            -- Only an id reused for another account, at the same moment, gets
            -- here. Never take credits for a reservation that was not written.
            RAISE EXCEPTION 'reservation id reserved concurrently for another account'
                USING ERRCODE = 'serialization_failure';
        END IF;
        UPDATE balances b SET available = a.have
        FROM unnest(v_teams, v_envs, v_have, v_had) AS a (team_id, environment, have, had)
        WHERE b.team_id = a.team_id AND b.environment = a.environment AND a.have <> a.had;
    END IF;

    IF cardinality(v_claims) > 0 THEN
        -- Each key is free (absent or expired): claims are made under the
        -- balance lock. An expired record is taken over as a new one.
        INSERT INTO idempotency_keys AS i
            (team_id, environment, idempotency_key, state, method, path, reservation_id,
             created_at)
        SELECT p_team_ids[o], p_environments[o], p_idem_keys[o], 'in_flight',
               p_idem_methods[o], p_idem_paths[o], p_ids[o], now()
        FROM unnest(v_claims) AS o
        ON CONFLICT (team_id, environment, idempotency_key) DO UPDATE
        SET state = excluded.state, method = excluded.method, path = excluded.path,
            reservation_id = excluded.reservation_id, body_hash = NULL, status = NULL,
            content_type = NULL, body = NULL, body_stored = false,
            created_at = excluded.created_at, completed_at = NULL
        WHERE i.created_at <= now() - interval '24 hours';
        GET DIAGNOSTICS v_inserted = ROW_COUNT;
        IF v_inserted <> cardinality(v_claims) THEN
            -- Only a claim made while the account had no balance row (so no
            -- lock to queue on) and got one meanwhile gets here. Never grant
            -- two first attempts: nothing of this batch is kept.
            RAISE EXCEPTION 'Idempotency-Key claimed concurrently'
                USING ERRCODE = 'serialization_failure';
        END IF;
    END IF;

    IF cardinality(v_replays) = 0 THEN
        RETURN QUERY
            SELECT x.g, x.a, NULL::text, NULL::text, NULL::text, NULL::text, NULL::integer,
                   NULL::text, NULL::bytea, NULL::boolean
            FROM unnest(v_granted, v_available) WITH ORDINALITY AS x (g, a, o)
            ORDER BY x.o;
        RETURN;
    END IF;
    -- A replayed record is one read (and locked) above, or one this batch wrote.
    RETURN QUERY
        SELECT x.g, x.a, i.state, i.method, i.path, i.body_hash, i.status, i.content_type,
               i.body, i.body_stored
        FROM unnest(v_granted, v_available) WITH ORDINALITY AS x (g, a, o)
        LEFT JOIN idempotency_keys i
            ON x.o = ANY (v_replays)
           AND i.team_id = p_team_ids[x.o] AND i.environment = p_environments[x.o]
           AND i.idempotency_key = p_idem_keys[x.o]
        ORDER BY x.o;
END
$$;

-- The version 1 signature, for a release that does not know about
-- Idempotency-Key (during a rolling upgrade); a later release may drop it.
CREATE OR REPLACE FUNCTION gateway_reserve(
    p_ids text[],
    p_team_ids text[],
    p_environments text[],
    p_key_ids text[],
    p_amounts integer[],
    p_lease_seconds double precision
) RETURNS TABLE (granted boolean, available bigint)
LANGUAGE sql AS $$
    SELECT r.granted, r.available
    FROM gateway_reserve(p_ids, p_team_ids, p_environments, p_key_ids, p_amounts,
                         p_lease_seconds, NULL, NULL, NULL) AS r
$$;

-- A claim for a charged request that reserves nothing (unlimited test
-- credits): no rows when it was made, else the unexpired record that holds
-- the key. FOR KEY SHARE conflicts with gateway_reserve's FOR UPDATE only.
CREATE FUNCTION gateway_claim_idempotency(
    p_team_id text,
    p_environment text,
    p_key text,
    p_method text,
    p_path text
) RETURNS TABLE (
    state text,
    method text,
    path text,
    body_hash text,
    status integer,
    content_type text,
    body bytea,
    body_stored boolean
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    PERFORM 1 FROM balances b
    WHERE b.team_id = p_team_id AND b.environment = p_environment
    FOR KEY SHARE OF b;
    LOOP
        INSERT INTO idempotency_keys AS i
            (team_id, environment, idempotency_key, state, method, path, created_at)
        VALUES (p_team_id, p_environment, p_key, 'in_flight', p_method, p_path, now())
        ON CONFLICT (team_id, environment, idempotency_key) DO UPDATE
        SET state = excluded.state, method = excluded.method, path = excluded.path,
            reservation_id = NULL, body_hash = NULL, status = NULL, content_type = NULL,
            body = NULL, body_stored = false, created_at = excluded.created_at,
            completed_at = NULL
        WHERE i.created_at <= now() - interval '24 hours';
        IF FOUND THEN
            RETURN;
        END IF;
        -- The conflicting row is locked now (ON CONFLICT DO UPDATE locks it
        -- even when its WHERE fails) and this statement sees it.
        RETURN QUERY
            SELECT i.state, i.method, i.path, i.body_hash, i.status, i.content_type, i.body,
                   i.body_stored
            FROM idempotency_keys i
            WHERE i.team_id = p_team_id AND i.environment = p_environment
              AND i.idempotency_key = p_key;
        IF FOUND THEN
            RETURN;
        END IF;
    END LOOP;
END
$$;
""",
    ),
    (
        4,
        r"""
-- The hot-path functions find reservations by id only. PL/pgSQL caches a
-- generic plan after five calls, blind to how many ids a batch holds; for
-- posts that was a hash join over a sequential scan, so every flush read
-- every reservation kept (measured: p50 at 500 req/s went from 2.5 ms to
-- 10 ms after 20,000 requests). A sequential scan is never the right plan
-- here, so these functions plan without one.
ALTER FUNCTION gateway_reserve(text[], text[], text[], text[], integer[], double precision,
                               text[], text[], text[])
    SET enable_seqscan = off;
ALTER FUNCTION gateway_resolve(text[], integer[], text) SET enable_seqscan = off;
ALTER FUNCTION gateway_claim_idempotency(text, text, text, text, text) SET enable_seqscan = off;
""",
    ),
    (
        5,
        r"""
-- PL/pgSQL plans each statement per call ("custom plans") for as long as it
-- thinks that is cheaper than one cached plan; for these functions it kept
-- doing so, and planning their six statements cost more than running them
-- (measured on a batch of one: 1.48 ms a reserve with its commit, 1.08 ms
-- with cached plans). Their statements look rows up by key only, and
-- migration 4 already rules out sequential scans, so one cached plan fits
-- every call.
ALTER FUNCTION gateway_reserve(text[], text[], text[], text[], integer[], double precision,
                               text[], text[], text[])
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION gateway_resolve(text[], integer[], text) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION gateway_claim_idempotency(text, text, text, text, text)
    SET plan_cache_mode = force_generic_plan;
""",
    ),
    (
        6,
        r"""
-- A batch of one reservation with no Idempotency-Key: what every request
-- sends when it has the ledger to itself (low concurrency, where latency is
-- judged). gateway_reserve's arrays, loop and ordering cost more than its
-- writes there (measured on a batch of one with its commit: p50 0.54 ms,
-- p99 0.95 ms; this function 0.37 / 0.56 ms). Same answers as
-- gateway_reserve for such a batch, in the same order of checks: the
-- balance row locked first, then the amount, then a reservation already
-- made under this id (a retry) read after the lock.
CREATE FUNCTION gateway_reserve_one(
    p_id text,
    p_team_id text,
    p_environment text,
    p_key_id text,
    p_amount integer,
    p_lease_seconds double precision
) RETURNS TABLE (granted boolean, available bigint)
LANGUAGE plpgsql
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    v_have bigint;
    v_inserted integer;
BEGIN
    SELECT b.available INTO v_have
    FROM balances b
    WHERE b.team_id = p_team_id AND b.environment = p_environment
    FOR UPDATE OF b;
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, 0::bigint;
        RETURN;
    END IF;
    IF v_have < p_amount THEN
        RETURN QUERY SELECT false, v_have;
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM reservations r WHERE r.id = p_id) THEN
        RETURN QUERY SELECT true, v_have;
        RETURN;
    END IF;
    INSERT INTO reservations
        (id, team_id, environment, key_id, amount, created_at, lease_deadline)
    VALUES (p_id, p_team_id, p_environment, p_key_id, p_amount, now(),
            now() + p_lease_seconds * interval '1 second')
    ON CONFLICT (id) DO NOTHING;
    GET DIAGNOSTICS v_inserted = ROW_COUNT;
    IF v_inserted <> 1 THEN
        -- Only an id reused for another account, at the same moment, gets here.
        RAISE EXCEPTION 'reservation id reserved concurrently for another account'
            USING ERRCODE = 'serialization_failure';
    END IF;
    UPDATE balances b SET available = v_have - p_amount
    WHERE b.team_id = p_team_id AND b.environment = p_environment;
    RETURN QUERY SELECT true, v_have - p_amount;
END
$$;
""",
    ),
    (
        7,
        """
-- See SQLite version 5: a grant's request hash and the balance it answered.
ALTER TABLE credit_entries ADD COLUMN request_hash text;
ALTER TABLE credit_entries ADD COLUMN balance_after bigint;
""",
    ),
]
