-- 0002: what the summary needs: a per-minute rollup, the latest reading per sensor, node status,
-- and the two views people query.
--
-- The pipeline maintains readings_minute and sensors inside the same transaction that inserts
-- the readings, counting only rows that really inserted (a redelivered reading changes nothing).

CREATE TABLE readings_minute (
    node        text             NOT NULL,
    sensor      text             NOT NULL,
    minute      timestamptz      NOT NULL,
    kind        text             NOT NULL,
    n           integer          NOT NULL,
    sum_c       double precision NOT NULL,
    min_c       double precision NOT NULL,
    max_c       double precision NOT NULL,
    n_h         integer          NOT NULL,
    sum_h       double precision,
    min_h       double precision,
    max_h       double precision,
    first_ts    timestamptz      NOT NULL,
    last_ts     timestamptz      NOT NULL,
    CONSTRAINT readings_minute_pkey PRIMARY KEY (node, sensor, minute),
    CONSTRAINT readings_minute_is_minute CHECK (minute = date_trunc('minute', minute))
);
COMMENT ON TABLE readings_minute IS
    'Per-minute aggregates of readings (by the reading''s ts), kept by the pipeline in the'
    ' transaction that inserts the readings; the summary view reads whole minutes from here.';
CREATE INDEX readings_minute_minute ON readings_minute (minute);

CREATE TABLE sensors (
    node                text             NOT NULL,
    sensor              text             NOT NULL,
    kind                text             NOT NULL,
    first_seen          timestamptz      NOT NULL DEFAULT now(),
    last_ts             timestamptz      NOT NULL,
    last_seq            bigint           NOT NULL,
    last_temperature_c  double precision NOT NULL,
    last_humidity_pct   double precision,
    CONSTRAINT sensors_pkey PRIMARY KEY (node, sensor)
);
COMMENT ON TABLE sensors IS 'Every sensor that ever reported, with its newest reading.';

CREATE TABLE nodes (
    node            text        NOT NULL,
    state           text        NOT NULL,
    state_since     timestamptz NOT NULL DEFAULT now(),
    last_seen       timestamptz NOT NULL DEFAULT now(),
    reported_at     timestamptz,
    agent_version   text,
    uptime_s        double precision,
    outbox_depth    bigint,
    dropped         bigint,
    read_errors     jsonb,
    CONSTRAINT nodes_pkey PRIMARY KEY (node),
    CONSTRAINT nodes_node_id CHECK (node ~ '^[A-Za-z0-9_-]{1,64}$'),
    CONSTRAINT nodes_state CHECK (state IN ('online', 'offline'))
);
COMMENT ON TABLE nodes IS
    'Each edge node''s last known status: retained online/offline, Last Will and heartbeats.';
COMMENT ON COLUMN nodes.last_seen IS 'Gateway time of the last status message from the node.';
COMMENT ON COLUMN nodes.reported_at IS 'The node''s own time in its last message, if it sent one.';

-- Exactly the readings with ts in (now() - 1 hour, now()]: whole minutes come from the rollup,
-- the partial minutes at both edges of the window from raw rows, so the view stays exact and
-- reads about 60 rollup rows per sensor instead of every reading.
CREATE VIEW sensor_summary_last_hour AS
WITH bounds AS (
    SELECT now() - interval '1 hour'                                  AS t0,
           now()                                                      AS t1,
           date_trunc('minute', now() - interval '1 hour') + interval '1 minute' AS m0,
           date_trunc('minute', now())                                AS m1
),
parts AS (
    SELECT r.node, r.sensor, r.kind, r.n::bigint AS n, r.sum_c, r.min_c, r.max_c,
           r.n_h::bigint AS n_h, r.sum_h, r.min_h, r.max_h, r.first_ts, r.last_ts
      FROM readings_minute r, bounds b
     WHERE r.minute >= b.m0 AND r.minute < b.m1
    UNION ALL
    SELECT x.node, x.sensor, max(x.kind), count(*), sum(x.temperature_c),
           min(x.temperature_c), max(x.temperature_c), count(x.humidity_pct),
           sum(x.humidity_pct), min(x.humidity_pct), max(x.humidity_pct), min(x.ts), max(x.ts)
      FROM readings x, bounds b
     WHERE x.ts > b.t0 AND x.ts < b.m0
     GROUP BY x.node, x.sensor
    UNION ALL
    SELECT x.node, x.sensor, max(x.kind), count(*), sum(x.temperature_c),
           min(x.temperature_c), max(x.temperature_c), count(x.humidity_pct),
           sum(x.humidity_pct), min(x.humidity_pct), max(x.humidity_pct), min(x.ts), max(x.ts)
      FROM readings x, bounds b
     WHERE x.ts >= b.m1 AND x.ts <= b.t1
     GROUP BY x.node, x.sensor
)
SELECT node,
       sensor,
       max(kind)                              AS kind,
       sum(n)::bigint                         AS readings,
       sum(sum_c) / sum(n)                    AS avg_c,
       min(min_c)                             AS min_c,
       max(max_c)                             AS max_c,
       sum(sum_h) / nullif(sum(n_h), 0)       AS avg_humidity_pct,
       min(min_h)                             AS min_humidity_pct,
       max(max_h)                             AS max_humidity_pct,
       min(first_ts)                          AS first_ts,
       max(last_ts)                           AS last_ts
  FROM parts
 GROUP BY node, sensor;
COMMENT ON VIEW sensor_summary_last_hour IS
    'One row per sensor that has readings with ts in (now() - 1 hour, now()].';

CREATE VIEW sensor_latest AS
SELECT s.node,
       s.sensor,
       s.kind,
       s.last_ts              AS ts,
       s.last_seq             AS seq,
       s.last_temperature_c   AS temperature_c,
       s.last_humidity_pct    AS humidity_pct,
       now() - s.last_ts      AS age,
       n.state                AS node_state,
       n.last_seen            AS node_last_seen,
       n.agent_version
  FROM sensors s
  LEFT JOIN nodes n USING (node);
COMMENT ON VIEW sensor_latest IS 'The newest reading of every sensor and its node''s status.';

GRANT SELECT, INSERT, UPDATE ON readings_minute, sensors, nodes TO tempmon_writer;
GRANT SELECT ON readings_minute, sensors, nodes, sensor_summary_last_hour, sensor_latest
    TO tempmon_reader;
GRANT SELECT ON sensor_summary_last_hour, sensor_latest TO tempmon_writer;
