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
