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
