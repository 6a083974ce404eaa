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
