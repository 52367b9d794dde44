-- 0007: the BME280. Air pressure is stored with each reading, rolled up like humidity and
-- shown by the summary; the kinds the database admits follow the contract
-- (tempmon_contract.kinds.KINDS and LEGACY; tests/system/test_contract_sql.py holds this
-- file to it).
--
-- Cheap on a big table: every statement below changes the catalog only. The new columns are
-- nullable or have a constant default (no rewrite). The new CHECK constraints are added NOT
-- VALID and left so: each admits every row stored before it (the kind list only grows; the
-- pressure column is NULL in every old row), and proving that by VALIDATE would scan every
-- partition while this migration's transaction holds readings' ACCESS EXCLUSIVE lock,
-- stalling the consumers for nothing. NOT VALID constraints are enforced on every row
-- written from now on, and the partitions made from now on get them as valid ones.

-- readings: the pressure column and its ranges. Only the kinds that measure pressure may
-- carry it (the decoder refuses it for the others first, with a reason).
ALTER TABLE readings ADD COLUMN pressure_hpa double precision;
COMMENT ON COLUMN readings.pressure_hpa IS
    'Air pressure in hPa from a kind that measures it (bme280); NULL otherwise.';

-- The kind CHECK is replaced by one with the contract's list. On the partitioned table the
-- parent's DROP also drops each partition's inherited copy, except where the partition had
-- the constraint of its own (readings_legacy, the table as it was before 0006): that copy
-- stays, now local only, and would clash by name with the new one, so it goes here too.
ALTER TABLE readings DROP CONSTRAINT readings_kind;
DO $$
DECLARE
    part regclass;
BEGIN
    FOR part IN SELECT c.conrelid::regclass
                  FROM pg_constraint AS c
                  JOIN pg_inherits AS i ON i.inhrelid = c.conrelid
                 WHERE i.inhparent = 'readings'::regclass AND c.conname = 'readings_kind'
    LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT readings_kind', part);
    END LOOP;
END
$$;

ALTER TABLE readings
    ADD CONSTRAINT readings_kind
        CHECK (kind IN ('ds18b20', 'dht22', 'cpu', 'simulated', 'bme280', 'legacy')) NOT VALID,
    ADD CONSTRAINT readings_pressure_range
        CHECK (pressure_hpa BETWEEN 300 AND 1100) NOT VALID,
    ADD CONSTRAINT readings_pressure_kind
        CHECK (pressure_hpa IS NULL OR kind = 'bme280') NOT VALID;

-- The rollups keep pressure as they keep humidity: how many readings had it, their sum,
-- min and max. n_p defaults to 0 so that a consumer of the previous release, still writing
-- during a rolling upgrade, keeps its rows consistent (it writes no pressure).
ALTER TABLE readings_minute
    ADD COLUMN n_p integer NOT NULL DEFAULT 0,
    ADD COLUMN sum_p double precision,
    ADD COLUMN min_p double precision,
    ADD COLUMN max_p double precision;
ALTER TABLE readings_10min
    ADD COLUMN n_p integer NOT NULL DEFAULT 0,
    ADD COLUMN sum_p double precision,
    ADD COLUMN min_p double precision,
    ADD COLUMN max_p double precision;

-- The newest reading per sensor, with its pressure (a view may gain columns at its end; its
-- grants stay).
ALTER TABLE sensors ADD COLUMN last_pressure_hpa double precision;
CREATE OR REPLACE VIEW sensor_latest AS
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
       n.agent_version,
       s.last_pressure_hpa    AS pressure_hpa
  FROM sensors s
  LEFT JOIN nodes n USING (node);

-- The summary of 0006 with the mean, min and max of pressure, NULL for a sensor that
-- reported none in the window. The new columns come last, after `exact`, so that a query
-- reading the earlier columns by position still reads the same ones. A function's result
-- type cannot change in place: the view over it goes first, and both come back with their
-- grants.
DROP VIEW sensor_summary_last_hour;
DROP FUNCTION sensor_summary(timestamptz, timestamptz);
CREATE FUNCTION sensor_summary(t0 timestamptz, t1 timestamptz)
RETURNS TABLE (
    node text, sensor text, kind text, readings bigint, avg_c double precision,
    min_c double precision, max_c double precision, avg_humidity_pct double precision,
    min_humidity_pct double precision, max_humidity_pct double precision,
    first_ts timestamptz, last_ts timestamptz, exact boolean,
    avg_pressure_hpa double precision, min_pressure_hpa double precision,
    max_pressure_hpa double precision
)
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET jit = off
SET max_parallel_workers_per_gather = 0
AS $fn$
DECLARE
    origin CONSTANT timestamptz := TIMESTAMPTZ '2000-01-01 00:00:00+00';
    -- Where each level is complete (read below): nothing dropped after kept_from, and nothing
    -- older than the oldest partition could be stored (a reading older than that was refused).
    raw_from timestamptz;
    minute_from timestamptz;
    buckets_from timestamptz;
    -- As in 0003: raw rows in (t0, m0), whole minutes [m0, b0), whole buckets [b0, b1),
    -- whole minutes [b1, m1), raw rows in [m1, t1]. An end whose raw rows were dropped moves
    -- out to the minute that holds it; where that minute was dropped too, to the bucket.
    m0 timestamptz := date_trunc('minute', t0) + interval '1 minute';
    m1 timestamptz := date_trunc('minute', t1);
    b0 timestamptz;
    b1 timestamptz;
    is_exact boolean;
BEGIN
    IF t1 <= t0 THEN
        RETURN;
    END IF;
    SELECT coalesce(max(greatest(d.kept_from, d.stored_from)) FILTER (WHERE d.level = 'raw'),
                    '-infinity'),
           coalesce(max(greatest(d.kept_from, d.stored_from)) FILTER (WHERE d.level = 'minute'),
                    '-infinity'),
           coalesce(max(greatest(d.kept_from, d.stored_from)) FILTER (WHERE d.level = '10min'),
                    '-infinity')
      INTO raw_from, minute_from, buckets_from
      FROM data_retention AS d;
    is_exact := t0 >= buckets_from;
    IF t0 < raw_from THEN
        is_exact := false;
        m0 := date_trunc('minute', t0);
    END IF;
    IF t1 < raw_from THEN
        m1 := date_trunc('minute', t1) + interval '1 minute';
    END IF;
    m1 := greatest(m1, m0);
    b0 := date_bin('10 minutes', m0 + interval '9 minutes', origin);
    b1 := greatest(date_bin('10 minutes', m1, origin), b0);
    IF m0 < minute_from THEN
        b0 := date_bin('10 minutes', m0, origin);
    END IF;
    IF m1 < minute_from THEN
        b1 := greatest(date_bin('10 minutes', m1 + interval '9 minutes', origin), b0);
    END IF;
    -- $1 t0, $2 t1, $3 m0, $4 m1, $5 b0, $6 b1, $7 and $8: raw rows at the left and the
    -- right end, $9 exact
    RETURN QUERY EXECUTE $q$
WITH parts AS (
    SELECT node, sensor, kind, n, sum_c, min_c, max_c, n_h, sum_h, min_h, max_h, n_p, sum_p,
           min_p, max_p, first_ts, last_ts
      FROM readings_10min WHERE bucket >= $5 AND bucket < $6
    UNION ALL
    SELECT node, sensor, kind, n, sum_c, min_c, max_c, n_h, sum_h, min_h, max_h, n_p, sum_p,
           min_p, max_p, first_ts, last_ts
      FROM readings_minute WHERE minute >= $3 AND minute < least($5, $4)
    UNION ALL
    SELECT node, sensor, kind, n, sum_c, min_c, max_c, n_h, sum_h, min_h, max_h, n_p, sum_p,
           min_p, max_p, first_ts, last_ts
      FROM readings_minute WHERE minute >= $6 AND minute < $4
    UNION ALL
    SELECT node, sensor, kind, 1, temperature_c, temperature_c, temperature_c,
           (humidity_pct IS NOT NULL)::integer, humidity_pct, humidity_pct, humidity_pct,
           (pressure_hpa IS NOT NULL)::integer, pressure_hpa, pressure_hpa, pressure_hpa, ts, ts
      FROM readings WHERE $7 AND ts > $1 AND ts < $3 AND ts <= $2
    UNION ALL
    SELECT node, sensor, kind, 1, temperature_c, temperature_c, temperature_c,
           (humidity_pct IS NOT NULL)::integer, humidity_pct, humidity_pct, humidity_pct,
           (pressure_hpa IS NOT NULL)::integer, pressure_hpa, pressure_hpa, pressure_hpa, ts, ts
      FROM readings WHERE $8 AND ts >= $4 AND ts > $1 AND ts <= $2
)
SELECT node, sensor, max(kind COLLATE "C"), sum(n), sum(sum_c) / sum(n), min(min_c),
       max(max_c), sum(sum_h) / nullif(sum(n_h), 0), min(min_h), max(max_h), min(first_ts),
       max(last_ts), $9, sum(sum_p) / nullif(sum(n_p), 0), min(min_p), max(max_p)
  FROM parts
 GROUP BY node, sensor
$q$ USING t0, t1, m0, m1, b0, b1, t0 >= raw_from, t1 >= raw_from, is_exact;
END
$fn$;
COMMENT ON FUNCTION sensor_summary(timestamptz, timestamptz) IS
    'One row per sensor with readings in (t0, t1]: count, mean, min and max of temperature,'
    ' humidity and air pressure (NULL where the sensor reported none). Exact (exact = true)'
    ' while t0 is inside the raw retention; beyond it an end of the window widens to the'
    ' whole minute, or ten minutes, that the rollups kept.';

CREATE VIEW sensor_summary_last_hour AS
SELECT * FROM sensor_summary(now() - interval '1 hour', now());
COMMENT ON VIEW sensor_summary_last_hour IS
    'One row per sensor that has readings with ts in (now() - 1 hour, now()].';

GRANT SELECT ON sensor_summary_last_hour TO tempmon_reader, tempmon_writer;
REVOKE ALL ON FUNCTION sensor_summary(timestamptz, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION sensor_summary(timestamptz, timestamptz)
    TO tempmon_reader, tempmon_writer;
