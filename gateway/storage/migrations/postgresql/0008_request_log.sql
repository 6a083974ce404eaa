-- See SQLite version 6: the request log. Rows are never updated. The client
-- address stays text (parsing each row as inet while writing cost more than
-- the rest of the write); a search by network parses it with gateway_inet,
-- which answers NULL for text that is no address instead of failing the query.
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
    user_agent text NOT NULL,
    duration_ms real NOT NULL
);
CREATE INDEX request_log_by_team ON request_log (team_id, at, id);
CREATE INDEX request_log_by_key ON request_log (team_id, key_id, at, id);
CREATE INDEX request_log_by_status ON request_log (team_id, status, at, id);
CREATE INDEX request_log_by_age ON request_log (at);

CREATE FUNCTION gateway_inet(p_text text) RETURNS inet
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN p_text::inet;
EXCEPTION WHEN invalid_text_representation THEN
    RETURN NULL;
END
$$;
