-- 0006: years of data. readings, readings_minute and readings_10min become partitioned by
-- time, old data goes by dropping whole partitions, and the summary says when it is exact.
--
-- Why PostgreSQL's own declarative partitioning, not pg_partman: it is in every PostgreSQL
-- since 11, so the official image and Debian's server need nothing installed, and what
-- pg_partman would do for us here (create partitions ahead, drop the old ones) is one small
-- function below, maintain_partitions(), which the consumers call (as tempmon_writer, with
-- the owner's rights) at start and every hour, and `pipeline maintain` calls on demand.
--
-- Partitions, in UTC: readings by day, readings_minute by month, readings_10min by year.
-- data_retention says how long each level is kept; only the owner role may change it
-- (`pipeline migrate` with PIPELINE_RETENTION_*_DAYS), so a writer can trigger the
-- retention the owner chose and nothing more.
--
-- Exactly once. A unique key on a partitioned table must contain the partition key; a key
-- of (node, sensor, seq, ts) would keep a redelivery at one row (it carries the same ts) but
-- would let a reused sequence number with another ts in as a second row. So every readings
-- partition has its own unique index on (node, sensor, seq), which `ON CONFLICT DO NOTHING`
-- uses as its arbiter, and node_seq_ranges records, per node and partition, the range of
-- sequence numbers stored there: a reading whose seq falls in another partition's range is
-- looked up there (one index probe, the other partitions pruned at run time). In-order
-- readings fall in no stored range and cost no probe.
--
-- An existing database keeps its rows where they are: each old table is attached whole as
-- the first partition (`<table>_legacy`, from MINVALUE to the start of the next day, month
-- or year) and dropped whole when its newest possible row passes the retention. Attaching
-- scans the old table once to check the bound (about 1 s per 10 million rows, under the
-- migration's lock; bench/partitions.py measures it), and nothing is copied.

CREATE TABLE data_retention (
    level       text        NOT NULL,
    tbl         text        NOT NULL,
    unit        text        NOT NULL,
    keep_days   integer,
    ahead       integer     NOT NULL,
    kept_from   timestamptz NOT NULL DEFAULT '-infinity',
    stored_from timestamptz,
    stored_to   timestamptz,
    legacy_to   timestamptz,
    CONSTRAINT data_retention_pkey PRIMARY KEY (level),
    CONSTRAINT data_retention_level CHECK (level IN ('raw', 'minute', '10min')),
    CONSTRAINT data_retention_unit CHECK (unit IN ('day', 'month', 'year')),
    CONSTRAINT data_retention_keep CHECK (keep_days BETWEEN 1 AND 100000),
    CONSTRAINT data_retention_ahead CHECK (ahead BETWEEN 1 AND 366)
);
COMMENT ON TABLE data_retention IS
    'How long each level of data is kept (keep_days, NULL: for ever) and what is held now:'
    ' every row with a time at or after kept_from is kept; partitions cover'
    ' [stored_from, stored_to). Kept by maintain_partitions().';
COMMENT ON COLUMN data_retention.kept_from IS
    'Nothing at or after this time was dropped (-infinity: nothing was ever dropped).';
COMMENT ON COLUMN data_retention.legacy_to IS
    'The end of the partition made from the table as it was before 0006, if it had rows.';

INSERT INTO data_retention (level, tbl, unit, keep_days, ahead) VALUES
    ('raw', 'readings', 'day', 30, 7),
    ('minute', 'readings_minute', 'month', 400, 1),
    ('10min', 'readings_10min', 'year', NULL, 1);

-- The range each partition of a table covers, read back from the catalog.
CREATE FUNCTION partition_bounds(parent regclass)
RETURNS TABLE (part regclass, lo timestamptz, hi timestamptz)
LANGUAGE sql STABLE
SET TimeZone = 'UTC'
AS $$
SELECT c.oid::regclass,
       CASE WHEN m[1] = 'MINVALUE' THEN '-infinity' ELSE btrim(m[1], '''')::timestamptz END,
       CASE WHEN m[2] = 'MAXVALUE' THEN 'infinity' ELSE btrim(m[2], '''')::timestamptz END
  FROM pg_inherits AS i
  JOIN pg_class AS c ON c.oid = i.inhrelid,
       regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \((.*)\) TO \((.*)\)') AS m
 WHERE i.inhparent = parent AND m IS NOT NULL
$$;

-- readings: the old table becomes the partition readings_legacy. A partition must have the
-- parent's CHECK constraints by name, so those keep theirs; the key and the indexes, whose
-- names are unique in the schema, are renamed. The parent's indexes then attach the
-- partition's equal ones instead of building new ones.
ALTER TABLE readings RENAME TO readings_legacy;
ALTER TABLE readings_legacy RENAME CONSTRAINT readings_pkey TO readings_legacy_key;
ALTER INDEX readings_sensor_ts RENAME TO readings_legacy_sensor_ts;
ALTER INDEX readings_ts RENAME TO readings_legacy_ts;

-- The same columns, defaults and CHECK constraints (with their names), and comments.
CREATE TABLE readings (
    LIKE readings_legacy INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING COMMENTS
) PARTITION BY RANGE (ts);
COMMENT ON TABLE readings IS
    'One row per reading a node took, partitioned by day (UTC) of ts; exactly once by'
    ' (node, sensor, seq): a unique index in each partition, and node_seq_ranges across them.';
CREATE INDEX readings_sensor_ts ON readings (node, sensor, ts DESC);
CREATE INDEX readings_ts ON readings (ts);

-- readings_minute and readings_10min: the same, with their keys on the parent (they contain
-- the partition key), which the rollup upserts name.
ALTER TABLE readings_minute RENAME TO readings_minute_legacy;
ALTER TABLE readings_minute_legacy
    RENAME CONSTRAINT readings_minute_pkey TO readings_minute_legacy_pkey;
ALTER INDEX readings_minute_minute RENAME TO readings_minute_legacy_minute;
CREATE TABLE readings_minute (
    LIKE readings_minute_legacy INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING COMMENTS,
    CONSTRAINT readings_minute_pkey PRIMARY KEY (node, sensor, minute)
) PARTITION BY RANGE (minute);
COMMENT ON TABLE readings_minute IS
    'Per-minute aggregates of readings (by the reading''s ts), kept by the pipeline in the'
    ' statement that inserts the readings; partitioned by month (UTC).';
CREATE INDEX readings_minute_minute ON readings_minute (minute);

ALTER TABLE readings_10min RENAME TO readings_10min_legacy;
ALTER TABLE readings_10min_legacy
    RENAME CONSTRAINT readings_10min_pkey TO readings_10min_legacy_pkey;
ALTER INDEX readings_10min_bucket RENAME TO readings_10min_legacy_bucket;
CREATE TABLE readings_10min (
    LIKE readings_10min_legacy INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING COMMENTS,
    CONSTRAINT readings_10min_pkey PRIMARY KEY (node, sensor, bucket)
) PARTITION BY RANGE (bucket);
COMMENT ON TABLE readings_10min IS
    'Ten-minute aggregates of readings (buckets aligned to UTC), kept by the pipeline with'
    ' readings_minute; partitioned by year (UTC).';
CREATE INDEX readings_10min_bucket ON readings_10min (bucket);

-- Per node and readings partition: the sequence numbers stored there lie in
-- [min_seq, max_seq] (a node's sequence is shared by its sensors). lo and hi are the
-- partition's bounds.
CREATE TABLE node_seq_ranges (
    node     text        NOT NULL,
    lo       timestamptz NOT NULL,
    hi       timestamptz NOT NULL,
    min_seq  bigint      NOT NULL,
    max_seq  bigint      NOT NULL,
    CONSTRAINT node_seq_ranges_pkey PRIMARY KEY (node, lo)
);
COMMENT ON TABLE node_seq_ranges IS
    'Per node and readings partition [lo, hi): the range of the sequence numbers stored'
    ' there. A reading whose seq lies in another partition''s range is looked up there.';
-- "Which stored ranges reach up to this batch's sequence numbers": in order, none.
CREATE INDEX node_seq_ranges_max ON node_seq_ranges (node, max_seq);

-- Attach each old table that has rows; drop the empty ones (a new database).
DO $$
DECLARE
    cutoff timestamptz;
BEGIN
    SET LOCAL TimeZone = 'UTC';
    IF EXISTS (SELECT FROM readings_legacy) THEN
        -- A day after the newest row (or after now): the partitions made from here on
        -- start where it ends.
        SELECT date_trunc('day', greatest(max(ts), now())) + interval '1 day'
          INTO cutoff FROM readings_legacy;
        EXECUTE format(
            'ALTER TABLE readings ATTACH PARTITION readings_legacy FOR VALUES FROM (MINVALUE) TO (%L)',
            cutoff);
        UPDATE data_retention SET legacy_to = cutoff WHERE level = 'raw';
        -- Every (node, sensor) of the old table, by a skip scan of its key (not from sensors,
        -- which tables older than 0002 did not fill), and each one's range from the same key.
        INSERT INTO node_seq_ranges (node, lo, hi, min_seq, max_seq)
        WITH RECURSIVE pairs AS (
            (SELECT r.node, r.sensor FROM readings_legacy AS r
              ORDER BY r.node, r.sensor LIMIT 1)
            UNION ALL
            SELECT n.node, n.sensor
              FROM pairs AS p,
                   LATERAL (SELECT r.node, r.sensor FROM readings_legacy AS r
                             WHERE (r.node, r.sensor) > (p.node, p.sensor)
                             ORDER BY r.node, r.sensor LIMIT 1) AS n
        )
        SELECT p.node, '-infinity', cutoff, min(k.min_seq), max(k.max_seq)
          FROM pairs AS p,
               LATERAL (SELECT min(r.seq) AS min_seq, max(r.seq) AS max_seq
                          FROM readings_legacy AS r
                         WHERE r.node = p.node AND r.sensor = p.sensor) AS k
         GROUP BY p.node;
    ELSE
        DROP TABLE readings_legacy;
    END IF;

    IF EXISTS (SELECT FROM readings_minute_legacy) THEN
        SELECT date_trunc('month', greatest(max(minute), now())) + interval '1 month'
          INTO cutoff FROM readings_minute_legacy;
        EXECUTE format(
            'ALTER TABLE readings_minute ATTACH PARTITION readings_minute_legacy'
            ' FOR VALUES FROM (MINVALUE) TO (%L)', cutoff);
        UPDATE data_retention SET legacy_to = cutoff WHERE level = 'minute';
    ELSE
        DROP TABLE readings_minute_legacy;
    END IF;

    IF EXISTS (SELECT FROM readings_10min_legacy) THEN
        SELECT date_trunc('year', greatest(max(bucket), now())) + interval '1 year'
          INTO cutoff FROM readings_10min_legacy;
        EXECUTE format(
            'ALTER TABLE readings_10min ATTACH PARTITION readings_10min_legacy'
            ' FOR VALUES FROM (MINVALUE) TO (%L)', cutoff);
        UPDATE data_retention SET legacy_to = cutoff WHERE level = '10min';
    ELSE
        DROP TABLE readings_10min_legacy;
    END IF;
END
$$;

-- Create the partitions the next readings need and drop those past their retention. Safe to
-- call at any time and from several consumers at once (they take turns). A partition that
-- cannot be made or dropped within 2 s (a long query holds the table) is left for the next call.
-- Returns what it did, one row per partition.
CREATE FUNCTION maintain_partitions()
RETURNS TABLE (action text, partition text, lo timestamptz, hi timestamptz)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
SET TimeZone = 'UTC'
SET lock_timeout = '2s'
AS $fn$
DECLARE
    pol record;
    old record;
    step interval;
    first timestamptz;
    last timestamptz;
    s timestamptz;
    name text;
BEGIN
    -- One caller at a time; the others wait for it (a writer that needs a partition must
    -- not give up while another consumer is making it), longer than the DDL's 2 s.
    PERFORM set_config('lock_timeout', '30s', true);
    PERFORM pg_advisory_xact_lock(2122121001);
    PERFORM set_config('lock_timeout', '2s', true);
    FOR pol IN SELECT * FROM data_retention ORDER BY keep_days NULLS LAST LOOP
        step := ('1 ' || pol.unit)::interval;
        -- Partitions for the whole retention window (readings a node kept while offline
        -- land in theirs) up to `ahead` periods past the current one. A level kept for ever
        -- starts as far back as the longest kept other level: every reading a partition
        -- takes must find its rollups' partitions too.
        first := date_trunc(pol.unit, now() - make_interval(days => coalesce(
            pol.keep_days, (SELECT max(d.keep_days) FROM data_retention AS d), 0)));
        last := date_trunc(pol.unit, now()) + pol.ahead * step;
        s := first;
        WHILE s <= last LOOP
            IF NOT EXISTS (SELECT FROM partition_bounds(pol.tbl::regclass) AS b
                            WHERE b.lo < s + step AND b.hi > s) THEN
                name := pol.tbl || '_p' || to_char(s, CASE pol.unit WHEN 'day' THEN 'YYYYMMDD'
                                                     WHEN 'month' THEN 'YYYYMM' ELSE 'YYYY' END);
                BEGIN
                    EXECUTE format(
                        'CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)%s',
                        name, pol.tbl, s, s + step,
                        CASE WHEN pol.level = 'raw' THEN '' ELSE ' WITH (fillfactor = 70)' END);
                    IF pol.level = 'raw' THEN
                        EXECUTE format('CREATE UNIQUE INDEX %I ON %I (node, sensor, seq)',
                                       name || '_key', name);
                    END IF;
                    action := 'created';
                EXCEPTION WHEN lock_not_available OR deadlock_detected THEN
                    action := 'busy, left for the next call';
                END;
                partition := name; lo := s; hi := s + step;
                RETURN NEXT;
            END IF;
            s := s + step;
        END LOOP;
        -- Drop what is wholly past the retention, oldest first.
        IF pol.keep_days IS NOT NULL THEN
            FOR old IN SELECT * FROM partition_bounds(pol.tbl::regclass) AS b
                        WHERE b.hi <= now() - make_interval(days => pol.keep_days)
                        ORDER BY b.hi LOOP
                name := old.part::text;
                BEGIN
                    EXECUTE format('DROP TABLE %s', old.part);
                    -- Once the old table's partition is gone, new partitions are days
                    -- again everywhere (the writers place each row's range by legacy_to).
                    UPDATE data_retention
                       SET kept_from = greatest(kept_from, old.hi),
                           legacy_to = CASE WHEN old.lo = '-infinity' THEN NULL
                                            ELSE legacy_to END
                     WHERE level = pol.level;
                    IF pol.level = 'raw' THEN
                        DELETE FROM node_seq_ranges AS k WHERE k.hi <= old.hi;
                    END IF;
                    action := 'dropped';
                EXCEPTION WHEN lock_not_available OR deadlock_detected THEN
                    action := 'busy, left for the next call';
                END;
                partition := name; lo := old.lo; hi := old.hi;
                RETURN NEXT;
                EXIT WHEN action <> 'dropped';
            END LOOP;
        END IF;
        UPDATE data_retention AS d
           SET stored_from = b.lo, stored_to = b.hi
          FROM (SELECT min(x.lo) AS lo, max(x.hi) AS hi
                  FROM partition_bounds(pol.tbl::regclass) AS x) AS b
         WHERE d.level = pol.level;
    END LOOP;
END
$fn$;
COMMENT ON FUNCTION maintain_partitions() IS
    'Creates the partitions ahead and drops those past data_retention.keep_days; the'
    ' consumers call it at start and every hour, `pipeline maintain` on demand.';

-- The summary, now saying whether it is exact. Inside the raw retention it is, as before.
-- Where the raw rows of the window's first or last partial minute were dropped, that minute
-- is counted whole from readings_minute; where the minute rollup was dropped too, the ten
-- minutes around it from readings_10min: the window widens to whole minutes (or ten-minute
-- buckets) at that end, and `exact` is false. first_ts and last_ts show the readings the
-- row really covers.
DROP VIEW sensor_summary_last_hour;
DROP FUNCTION sensor_summary(timestamptz, timestamptz);
CREATE FUNCTION sensor_summary(t0 timestamptz, t1 timestamptz)
RETURNS TABLE (
    node text, sensor text, kind text, readings bigint, avg_c double precision,
    min_c double precision, max_c double precision, avg_humidity_pct double precision,
    min_humidity_pct double precision, max_humidity_pct double precision,
    first_ts timestamptz, last_ts timestamptz, exact boolean
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
      FROM readings WHERE $7 AND ts > $1 AND ts < $3 AND ts <= $2
    UNION ALL
    SELECT node, sensor, kind, 1, temperature_c, temperature_c, temperature_c,
           (humidity_pct IS NOT NULL)::integer, humidity_pct, humidity_pct, humidity_pct, ts, ts
      FROM readings WHERE $8 AND ts >= $4 AND ts > $1 AND ts <= $2
)
SELECT node, sensor, max(kind COLLATE "C"), sum(n), sum(sum_c) / sum(n), min(min_c),
       max(max_c), sum(sum_h) / nullif(sum(n_h), 0), min(min_h), max(max_h), min(first_ts),
       max(last_ts), $9
  FROM parts
 GROUP BY node, sensor
$q$ USING t0, t1, m0, m1, b0, b1, t0 >= raw_from, t1 >= raw_from, is_exact;
END
$fn$;
COMMENT ON FUNCTION sensor_summary(timestamptz, timestamptz) IS
    'One row per sensor with readings in (t0, t1]: count, mean, min and max of temperature and'
    ' humidity. Exact (exact = true) while t0 is inside the raw retention; beyond it an end'
    ' of the window widens to the whole minute, or ten minutes, that the rollups kept.';

CREATE VIEW sensor_summary_last_hour AS
SELECT * FROM sensor_summary(now() - interval '1 hour', now());
COMMENT ON VIEW sensor_summary_last_hour IS
    'One row per sensor that has readings with ts in (now() - 1 hour, now()].';

GRANT SELECT, INSERT ON readings TO tempmon_writer;
GRANT SELECT ON readings TO tempmon_reader;
GRANT SELECT, INSERT, UPDATE ON readings_minute, readings_10min TO tempmon_writer;
GRANT SELECT ON readings_minute, readings_10min TO tempmon_reader;
GRANT SELECT, INSERT, UPDATE ON node_seq_ranges TO tempmon_writer;
GRANT SELECT ON node_seq_ranges, data_retention TO tempmon_reader, tempmon_writer;
GRANT SELECT ON sensor_summary_last_hour TO tempmon_reader, tempmon_writer;
REVOKE ALL ON FUNCTION sensor_summary(timestamptz, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION sensor_summary(timestamptz, timestamptz)
    TO tempmon_reader, tempmon_writer;
REVOKE ALL ON FUNCTION maintain_partitions() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION maintain_partitions() TO tempmon_writer;

SELECT count(*) FROM maintain_partitions();
