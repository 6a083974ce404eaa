-- Per-key spend caps and calendar request quotas (see gateway/caps.py).
-- A cap is at most C credits per UTC day and/or calendar month for one key; a
-- quota is at most Q requests per day and/or month for a key or a team.
ALTER TABLE api_keys
    ADD COLUMN credit_cap_per_day bigint CHECK (credit_cap_per_day > 0),
    ADD COLUMN credit_cap_per_month bigint CHECK (credit_cap_per_month > 0),
    ADD COLUMN quota_per_day bigint CHECK (quota_per_day > 0),
    ADD COLUMN quota_per_month bigint CHECK (quota_per_month > 0);
ALTER TABLE teams
    ADD COLUMN quota_per_day bigint CHECK (quota_per_day > 0),
    ADD COLUMN quota_per_month bigint CHECK (quota_per_month > 0);

-- The periods a capped reservation counted against (NULL for uncapped keys).
ALTER TABLE reservations ADD COLUMN cap_day text, ADD COLUMN cap_month text;

-- What each capped key has spent per period: the sum of its reservations of the
-- period (held while pending, charged once resolved). Written only while the
-- key's balance row is locked (gateway_reserve_capped, gateway_resolve), so
-- the balance row orders every writer and no two can deadlock.
CREATE TABLE key_spend (
    key_id text COLLATE "C" NOT NULL,
    period_key text COLLATE "C" NOT NULL,
    spent bigint NOT NULL CHECK (spent >= 0),
    PRIMARY KEY (key_id, period_key)
);

-- Calendar request quotas counted by the store (when no Redis limiter is
-- configured): one row per subject ("k:<key id>", "t:<team id>") and period.
CREATE TABLE quota_counts (
    subject text COLLATE "C" NOT NULL,
    period_key text COLLATE "C" NOT NULL,
    used bigint NOT NULL CHECK (used >= 0),
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (subject, period_key)
);
CREATE INDEX quota_counts_expires_at ON quota_counts (expires_at);

-- The reserve of a batch whose keys have caps: the balance check and the cap
-- check are one step under the account's balance lock (no check-then-act).
-- Accounts are locked in key order, like gateway_reserve, so the two never
-- deadlock. Each request is judged in the order it came for its account; the
-- answer carries its ordinal (rows come back in account order). "available"
-- is what the key may still spend: the smaller of the balance and what every
-- cap has left. Same Idempotency-Key rules as gateway_reserve.
CREATE FUNCTION gateway_reserve_capped(
    p_ids text[],
    p_team_ids text[],
    p_environments text[],
    p_key_ids text[],
    p_amounts integer[],
    p_lease_seconds double precision,
    p_idem_keys text[],
    p_idem_methods text[],
    p_idem_paths text[],
    p_day_keys text[],
    p_day_caps bigint[],
    p_month_keys text[],
    p_month_caps bigint[]
) RETURNS TABLE (
    ord integer,
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
LANGUAGE plpgsql
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    v_req record;
    v_held record;
    v_account text := NULL;
    v_have bigint;
    v_left bigint;
    v_spent bigint;
    v_inserted integer;
BEGIN
    FOR v_req IN
        SELECT u.*
        FROM unnest(p_ids, p_team_ids, p_environments, p_key_ids, p_amounts, p_idem_keys,
                    p_idem_methods, p_idem_paths, p_day_keys, p_day_caps, p_month_keys,
                    p_month_caps)
            WITH ORDINALITY AS u (id, team_id, environment, key_id, amount, idem_key,
                                  idem_method, idem_path, day_key, day_cap, month_key,
                                  month_cap, ord)
        ORDER BY u.team_id COLLATE "C", u.environment COLLATE "C", u.ord
    LOOP
        IF v_account IS DISTINCT FROM v_req.team_id || ' ' || v_req.environment THEN
            PERFORM 1 FROM balances b
            WHERE b.team_id = v_req.team_id AND b.environment = v_req.environment
            FOR UPDATE OF b;
            v_account := v_req.team_id || ' ' || v_req.environment;
        END IF;
        SELECT coalesce(max(b.available), 0) INTO v_have
        FROM balances b
        WHERE b.team_id = v_req.team_id AND b.environment = v_req.environment;

        v_left := NULL;
        IF v_req.day_cap IS NOT NULL THEN
            SELECT coalesce(max(s.spent), 0) INTO v_spent
            FROM key_spend s WHERE s.key_id = v_req.key_id AND s.period_key = v_req.day_key;
            v_left := v_req.day_cap - v_spent;
        END IF;
        IF v_req.month_cap IS NOT NULL THEN
            SELECT coalesce(max(s.spent), 0) INTO v_spent
            FROM key_spend s WHERE s.key_id = v_req.key_id AND s.period_key = v_req.month_key;
            v_left := least(v_left, v_req.month_cap - v_spent);
        END IF;
        IF v_left < 0 THEN
            v_left := 0;  -- a cap lowered below what was spent leaves nothing
        END IF;

        v_held := NULL;
        IF v_req.idem_key IS NOT NULL THEN
            SELECT i.* INTO v_held FROM idempotency_keys i
            WHERE i.team_id = v_req.team_id AND i.environment = v_req.environment
              AND i.idempotency_key = v_req.idem_key
              AND i.created_at > now() - interval '24 hours'
            FOR SHARE OF i;
            IF FOUND AND v_held.reservation_id IS DISTINCT FROM v_req.id THEN
                RETURN QUERY SELECT v_req.ord::integer, false, least(v_have, v_left),
                    v_held.state, v_held.method, v_held.path, v_held.body_hash, v_held.status,
                    v_held.content_type, v_held.body, v_held.body_stored;
                CONTINUE;
            END IF;
        END IF;

        IF v_have < v_req.amount THEN
            RETURN QUERY SELECT v_req.ord::integer, false, least(v_have, v_left),
                NULL::text, NULL::text, NULL::text, NULL::text, NULL::integer, NULL::text,
                NULL::bytea, NULL::boolean;
            CONTINUE;
        END IF;
        -- A retried id was reserved (and counted) already: granted, never taken twice.
        IF EXISTS (SELECT 1 FROM reservations r WHERE r.id = v_req.id) THEN
            RETURN QUERY SELECT v_req.ord::integer, true, least(v_have, v_left),
                NULL::text, NULL::text, NULL::text, NULL::text, NULL::integer, NULL::text,
                NULL::bytea, NULL::boolean;
            CONTINUE;
        END IF;
        IF v_left IS NOT NULL AND v_left < v_req.amount THEN
            RETURN QUERY SELECT v_req.ord::integer, false, least(v_have, v_left),
                NULL::text, NULL::text, NULL::text, NULL::text, NULL::integer, NULL::text,
                NULL::bytea, NULL::boolean;
            CONTINUE;
        END IF;

        INSERT INTO reservations
            (id, team_id, environment, key_id, amount, created_at, lease_deadline,
             cap_day, cap_month)
        VALUES (v_req.id, v_req.team_id, v_req.environment, v_req.key_id, v_req.amount, now(),
                now() + p_lease_seconds * interval '1 second',
                CASE WHEN v_req.day_cap IS NOT NULL THEN v_req.day_key END,
                CASE WHEN v_req.month_cap IS NOT NULL THEN v_req.month_key END)
        ON CONFLICT (id) DO NOTHING;
        GET DIAGNOSTICS v_inserted = ROW_COUNT;
        IF v_inserted <> 1 THEN
            RAISE EXCEPTION 'reservation id reserved concurrently for another account'
                USING ERRCODE = 'serialization_failure';
        END IF;
        INSERT INTO key_spend AS s (key_id, period_key, spent)
        SELECT v_req.key_id, p.period_key, v_req.amount
        FROM (VALUES (CASE WHEN v_req.day_cap IS NOT NULL THEN v_req.day_key END),
                     (CASE WHEN v_req.month_cap IS NOT NULL THEN v_req.month_key END))
            AS p (period_key)
        WHERE p.period_key IS NOT NULL
        ON CONFLICT (key_id, period_key) DO UPDATE SET spent = s.spent + excluded.spent;
        UPDATE balances b SET available = v_have - v_req.amount
        WHERE b.team_id = v_req.team_id AND b.environment = v_req.environment;

        IF v_req.idem_key IS NOT NULL AND v_held IS NULL THEN
            INSERT INTO idempotency_keys AS i
                (team_id, environment, idempotency_key, state, method, path, reservation_id,
                 created_at)
            VALUES (v_req.team_id, v_req.environment, v_req.idem_key, 'in_flight',
                    v_req.idem_method, v_req.idem_path, v_req.id, now())
            ON CONFLICT (team_id, environment, idempotency_key) DO UPDATE
            SET state = excluded.state, method = excluded.method, path = excluded.path,
                reservation_id = excluded.reservation_id, body_hash = NULL, status = NULL,
                content_type = NULL, body = NULL, body_stored = false,
                created_at = excluded.created_at, completed_at = NULL
            WHERE i.created_at <= now() - interval '24 hours';
            GET DIAGNOSTICS v_inserted = ROW_COUNT;
            IF v_inserted <> 1 THEN
                RAISE EXCEPTION 'Idempotency-Key claimed concurrently'
                    USING ERRCODE = 'serialization_failure';
            END IF;
        END IF;
        RETURN QUERY SELECT v_req.ord::integer, true,
            least(v_have - v_req.amount, v_left - v_req.amount),
            NULL::text, NULL::text, NULL::text, NULL::text, NULL::integer, NULL::text,
            NULL::bytea, NULL::boolean;
    END LOOP;
END
$$;

-- gateway_resolve of version 1, which also gives a capped reservation's unused
-- part back to its key's spend, after the balance rows are locked (the order
-- gateway_reserve_capped takes them in: balance, then spend).
CREATE OR REPLACE FUNCTION gateway_resolve(p_ids text[], p_charged integer[], p_kind text)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_applied integer;
    v_teams text[];
    v_envs text[];
    v_refunds bigint[];
    v_spend_keys text[];
    v_spend_periods text[];
    v_spend_refunds bigint[];
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
        RETURNING r.team_id, r.environment, r.amount - r.charged AS refund, r.key_id,
                  r.cap_day, r.cap_month
    ), per_account AS (
        SELECT s.team_id, s.environment, count(*) AS n, sum(s.refund) AS refund
        FROM resolved s GROUP BY s.team_id, s.environment
    ), per_spend AS (
        SELECT s.key_id, p.period_key, sum(s.refund) AS refund
        FROM resolved s
        CROSS JOIN LATERAL (VALUES (s.cap_day), (s.cap_month)) AS p (period_key)
        WHERE p.period_key IS NOT NULL AND s.refund > 0
        GROUP BY s.key_id, p.period_key
    )
    SELECT (SELECT coalesce(sum(p.n), 0)::integer FROM per_account p),
           (SELECT array_agg(p.team_id) FILTER (WHERE p.refund > 0) FROM per_account p),
           (SELECT array_agg(p.environment) FILTER (WHERE p.refund > 0) FROM per_account p),
           (SELECT array_agg(p.refund) FILTER (WHERE p.refund > 0) FROM per_account p),
           (SELECT array_agg(k.key_id) FROM per_spend k),
           (SELECT array_agg(k.period_key) FROM per_spend k),
           (SELECT array_agg(k.refund) FROM per_spend k)
    INTO v_applied, v_teams, v_envs, v_refunds, v_spend_keys, v_spend_periods, v_spend_refunds;

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
    IF v_spend_keys IS NOT NULL THEN
        UPDATE key_spend s SET spent = s.spent - a.refund
        FROM unnest(v_spend_keys, v_spend_periods, v_spend_refunds)
            AS a (key_id, period_key, refund)
        WHERE s.key_id = a.key_id AND s.period_key = a.period_key;
    END IF;
    RETURN v_applied;
END
$$;
ALTER FUNCTION gateway_resolve(text[], integer[], text) SET enable_seqscan = off;
ALTER FUNCTION gateway_resolve(text[], integer[], text) SET plan_cache_mode = force_generic_plan;

-- Caps and quotas are part of what authentication reads: every key cache hears of them.
DROP TRIGGER api_keys_updated ON api_keys;
CREATE CONSTRAINT TRIGGER api_keys_updated AFTER UPDATE ON api_keys
DEFERRABLE INITIALLY DEFERRED
FOR EACH ROW WHEN (
    (OLD.key_hash, OLD.team_id, OLD.environment, OLD.prefix, OLD.rate_limit_per_minute,
     OLD.disabled, OLD.expires_at, OLD.revoked_at, OLD.credit_cap_per_day,
     OLD.credit_cap_per_month, OLD.quota_per_day, OLD.quota_per_month)
    IS DISTINCT FROM
    (NEW.key_hash, NEW.team_id, NEW.environment, NEW.prefix, NEW.rate_limit_per_minute,
     NEW.disabled, NEW.expires_at, NEW.revoked_at, NEW.credit_cap_per_day,
     NEW.credit_cap_per_month, NEW.quota_per_day, NEW.quota_per_month)
) EXECUTE FUNCTION gateway_api_key_changed();

DROP TRIGGER teams_limit_updated ON teams;
CREATE CONSTRAINT TRIGGER teams_limit_updated
AFTER UPDATE OF rate_limit_per_minute, quota_per_day, quota_per_month ON teams
DEFERRABLE INITIALLY DEFERRED
FOR EACH ROW WHEN (
    (OLD.rate_limit_per_minute, OLD.quota_per_day, OLD.quota_per_month)
    IS DISTINCT FROM (NEW.rate_limit_per_minute, NEW.quota_per_day, NEW.quota_per_month)
)
EXECUTE FUNCTION gateway_team_limit_changed();

-- One request against its quotas, all or nothing: every count is raised by one
-- unless one of them is full, then none is. The rows are made (at zero) and
-- locked in key order first, so concurrent takers queue and never deadlock.
-- Returns each count's use (after the request when "taken", else as found).
CREATE FUNCTION gateway_take_quota(
    p_subjects text[],
    p_periods text[],
    p_limits bigint[],
    p_expires timestamptz[]
) RETURNS TABLE (ord integer, used bigint, taken boolean)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    v_full boolean;
BEGIN
    INSERT INTO quota_counts (subject, period_key, used, expires_at)
    SELECT u.subject, u.period_key, 0, u.expires_at
    FROM unnest(p_subjects, p_periods, p_expires) AS u (subject, period_key, expires_at)
    ORDER BY u.subject COLLATE "C", u.period_key COLLATE "C"
    ON CONFLICT (subject, period_key) DO NOTHING;
    PERFORM 1 FROM quota_counts q
    JOIN unnest(p_subjects, p_periods) AS u (subject, period_key)
        ON q.subject = u.subject AND q.period_key = u.period_key
    ORDER BY q.subject, q.period_key
    FOR UPDATE OF q;
    SELECT coalesce(bool_or(q.used >= u.cap), false) INTO v_full
    FROM quota_counts q
    JOIN unnest(p_subjects, p_periods, p_limits) AS u (subject, period_key, cap)
        ON q.subject = u.subject AND q.period_key = u.period_key;
    IF NOT v_full THEN
        UPDATE quota_counts q SET used = q.used + 1
        FROM unnest(p_subjects, p_periods) AS u (subject, period_key)
        WHERE q.subject = u.subject AND q.period_key = u.period_key;
    END IF;
    RETURN QUERY
        SELECT u.ord::integer, q.used, NOT v_full
        FROM unnest(p_subjects, p_periods) WITH ORDINALITY AS u (subject, period_key, ord)
        JOIN quota_counts q ON q.subject = u.subject AND q.period_key = u.period_key
        ORDER BY u.ord;
END
$$;
