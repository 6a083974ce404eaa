-- See SQLite version 6: the request log. client_net is the client address as
-- inet when it is one (NULL otherwise), so a CIDR filter is an index-free
-- comparison that never fails on odd text; rows are never updated (fillfactor 100).
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
    client_net inet,
    user_agent text NOT NULL,
    duration_ms real NOT NULL
);
CREATE INDEX request_log_by_team ON request_log (team_id, at, id);
CREATE INDEX request_log_by_key ON request_log (team_id, key_id, at, id);
CREATE INDEX request_log_by_status ON request_log (team_id, status, at, id);
CREATE INDEX request_log_by_age ON request_log (at);
