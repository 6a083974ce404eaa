-- See SQLite version 6: the request log. Rows are never updated.
--
-- client_net is the client address as inet, computed by the server while a
-- batch is copied in (NULL for text that is no address: a forwarded address is
-- client text), so a search by address or network reads an index. gateway_inet
-- casts dotted IPv4 directly; only other text pays for the exception block
-- (a subtransaction, hence not PARALLEL SAFE).
CREATE FUNCTION gateway_inet(p_text text) RETURNS inet
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_text ~ '^(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}$' THEN
        RETURN p_text::inet;
    END IF;
    BEGIN
        RETURN p_text::inet;
    EXCEPTION WHEN invalid_text_representation THEN
        RETURN NULL;
    END;
END
$$;

CREATE TABLE request_log (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at timestamptz NOT NULL,
    team_id text COLLATE "C" NOT NULL,
    key_id text COLLATE "C" NOT NULL,
    key_prefix text NOT NULL,
    environment text NOT NULL,
    request_id text NOT NULL,
    method text NOT NULL,
    route text NOT NULL,
    path text COLLATE "C" NOT NULL,
    status smallint NOT NULL,
    outcome text NOT NULL,
    credits integer NOT NULL,
    client_ip text NOT NULL,
    client_net inet GENERATED ALWAYS AS (gateway_inet(client_ip)) STORED,
    user_agent text NOT NULL,
    duration_ms real NOT NULL
);
CREATE INDEX request_log_by_team ON request_log (team_id, at, id);
CREATE INDEX request_log_by_key ON request_log (team_id, key_id, at, id);
CREATE INDEX request_log_by_status ON request_log (team_id, status, at, id);
CREATE INDEX request_log_by_address ON request_log (team_id, client_net);
CREATE INDEX request_log_by_age ON request_log (at);
