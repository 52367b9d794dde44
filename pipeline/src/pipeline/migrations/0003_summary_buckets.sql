-- 0003: ten-minute buckets under the summary, and the summary for any window.
--
-- With 1,000 sensors the last hour is about 60,000 rollup rows, and aggregating them took
-- 60-70 ms (bench/summary.py). A window of whole minutes is now read as whole ten-minute
-- buckets plus at most nine minutes at each end: about 14 rollup rows per sensor instead of
-- 59, and the view stays exact. The pipeline keeps readings_10min in the same transaction as
-- readings_minute, from the rows that really inserted.
--
-- Buckets start at multiples of ten minutes since 2000-01-01 UTC (date_bin), so they do not
-- depend on the session's time zone.

CREATE TABLE readings_10min (
    node        text             NOT NULL,
    sensor      text             NOT NULL,
    bucket      timestamptz      NOT NULL,
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
    CONSTRAINT readings_10min_pkey PRIMARY KEY (node, sensor, bucket),
    CONSTRAINT readings_10min_is_bucket
        CHECK (bucket = date_bin('10 minutes', bucket, TIMESTAMPTZ '2000-01-01 00:00:00+00'))
) WITH (fillfactor = 70);
COMMENT ON TABLE readings_10min IS
    'Ten-minute aggregates of readings (by the reading''s ts, buckets aligned to UTC), kept by'
    ' the pipeline with readings_minute; the summary reads whole buckets from here.';
CREATE INDEX readings_10min_bucket ON readings_10min (bucket);

-- Rollup rows are updated by every batch that touches their minute or bucket: room on the
-- page keeps those updates HOT, so the versions are pruned in place and the indexes do not
-- fill with dead entries that the summary would have to visit.
ALTER TABLE readings_minute SET (fillfactor = 70);

-- The summary reads the raw rows of the window's two partial minutes, across all sensors. A
-- BRIN index answers that by reading its whole summary of the table, which grows with the
-- table (about 4 ms per scan on 50 million rows) and misses every page appended since the
-- last VACUUM; a B-tree finds the few thousand rows directly. New timestamps arrive in order,
-- so the B-tree grows at its right edge.
DROP INDEX readings_ts_brin;
CREATE INDEX readings_ts ON readings (ts);

-- Existing data: the buckets are exact sums of the minutes they hold.
INSERT INTO readings_10min
    (node, sensor, bucket, kind, n, sum_c, min_c, max_c, n_h, sum_h, min_h, max_h,
     first_ts, last_ts)
SELECT node, sensor, date_bin('10 minutes', minute, TIMESTAMPTZ '2000-01-01 00:00:00+00'),
       max(kind), sum(n), sum(sum_c), min(min_c), max(max_c), sum(n_h), sum(sum_h),
       min(min_h), max(max_h), min(first_ts), max(last_ts)
  FROM readings_minute
 GROUP BY 1, 2, 3
 ORDER BY 3, 1, 2;

-- Exactly the readings with ts in (t0, t1], per sensor: the whole ten-minute buckets from
-- readings_10min, the whole minutes outside them from readings_minute, and the raw rows of
-- the partial minutes at both ends, all five ranges aggregated together. Counts stay integer
-- (sum() of integer is a bigint, kept in machine words) and kind is compared bytewise, not by
-- the database's locale.
--
-- PL/pgSQL with EXECUTE ... USING: the statement is planned for the actual bounds, so the
-- planner knows each range holds a few thousand rows. A plain SQL function is either inlined
-- (the bounds are expressions it cannot estimate) or planned generically; on 50 million rows
-- either way it guessed millions of rows, went parallel over the whole last hour and spent
-- 1.7 s compiling the query with JIT (bench/summary.py). Neither JIT nor parallel workers pay
-- off for a query that reads about 20 rows per sensor.
CREATE FUNCTION sensor_summary(t0 timestamptz, t1 timestamptz)
RETURNS TABLE (
    node text, sensor text, kind text, readings bigint, avg_c double precision,
    min_c double precision, max_c double precision, avg_humidity_pct double precision,
    min_humidity_pct double precision, max_humidity_pct double precision,
    first_ts timestamptz, last_ts timestamptz
)
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET jit = off
SET max_parallel_workers_per_gather = 0
AS $fn$
DECLARE
    origin CONSTANT timestamptz := TIMESTAMPTZ '2000-01-01 00:00:00+00';
    -- whole minutes [m0, m1) and whole buckets [b0, b1); empty ranges when the window is short
    m0 CONSTANT timestamptz := date_trunc('minute', t0) + interval '1 minute';
    m1 CONSTANT timestamptz := greatest(date_trunc('minute', t1), m0);
    b0 CONSTANT timestamptz := date_bin('10 minutes', m0 + interval '9 minutes', origin);
    b1 CONSTANT timestamptz := greatest(date_bin('10 minutes', m1, origin), b0);
BEGIN
    IF t1 <= t0 THEN
        RETURN;
    END IF;
    -- $1 t0, $2 t1, $3 m0, $4 m1, $5 b0, $6 b1
    RETURN QUERY EXECUTE $q$
WITH parts AS (
    SELECT node, sensor, kind, n, sum_c, min_c, max_c, n_h, sum_h, min_h, max_h, first_ts,
           last_ts
      FROM readings_10min WHERE bucket >= $5 AND bucket < $6
    UNION ALL
    SELECT node, sensor, kind, n, sum_c, min_c, max_c, n_h, sum_h, min_h, max_h, first_ts,
           last_ts
      FROM readings_minute WHERE minute >= $3 AND minute < least($5, $4)
    UNION ALL
    SELECT node, sensor, kind, n, sum_c, min_c, max_c, n_h, sum_h, min_h, max_h, first_ts,
           last_ts
      FROM readings_minute WHERE minute >= $6 AND minute < $4
    UNION ALL
    SELECT node, sensor, kind, 1, temperature_c, temperature_c, temperature_c,
           (humidity_pct IS NOT NULL)::integer, humidity_pct, humidity_pct, humidity_pct, ts, ts
      FROM readings WHERE ts > $1 AND ts < $3 AND ts <= $2
    UNION ALL
    SELECT node, sensor, kind, 1, temperature_c, temperature_c, temperature_c,
           (humidity_pct IS NOT NULL)::integer, humidity_pct, humidity_pct, humidity_pct, ts, ts
      FROM readings WHERE ts >= $4 AND ts > $1 AND ts <= $2
)
SELECT node, sensor, max(kind COLLATE "C"), sum(n), sum(sum_c) / sum(n), min(min_c),
       max(max_c), sum(sum_h) / nullif(sum(n_h), 0), min(min_h), max(max_h), min(first_ts),
       max(last_ts)
  FROM parts
 GROUP BY node, sensor
$q$ USING t0, t1, m0, m1, b0, b1;
END
$fn$;
COMMENT ON FUNCTION sensor_summary(timestamptz, timestamptz) IS
    'One row per sensor with readings in (t0, t1]: count, mean, min and max of temperature and'
    ' humidity, exact, from the rollups and the raw rows at the window''s edges.';

CREATE OR REPLACE VIEW sensor_summary_last_hour AS
SELECT * FROM sensor_summary(now() - interval '1 hour', now());

GRANT SELECT, INSERT, UPDATE ON readings_10min TO tempmon_writer;
GRANT SELECT ON readings_10min TO tempmon_reader;
REVOKE ALL ON FUNCTION sensor_summary(timestamptz, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION sensor_summary(timestamptz, timestamptz)
    TO tempmon_reader, tempmon_writer;
