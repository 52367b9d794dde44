-- 0001: the readings table and the two group roles that use it.
--
-- Natural key (node, sensor, seq): a node's sequence number never repeats, so a redelivered or
-- republished reading hits the key and `INSERT ... ON CONFLICT DO NOTHING` keeps exactly one row.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tempmon_writer') THEN
        CREATE ROLE tempmon_writer NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tempmon_reader') THEN
        CREATE ROLE tempmon_reader NOLOGIN;
    END IF;
END
$$;

CREATE TABLE readings (
    node            text             NOT NULL,
    sensor          text             NOT NULL,
    seq             bigint           NOT NULL,
    kind            text             NOT NULL,
    ts              timestamptz      NOT NULL,
    temperature_c   double precision NOT NULL,
    humidity_pct    double precision,
    time_uncertain  boolean          NOT NULL DEFAULT false,
    received_at     timestamptz      NOT NULL DEFAULT now(),
    CONSTRAINT readings_pkey PRIMARY KEY (node, sensor, seq),
    CONSTRAINT readings_node_id CHECK (node ~ '^[A-Za-z0-9_-]{1,64}$'),
    CONSTRAINT readings_sensor_id CHECK (sensor ~ '^[A-Za-z0-9_-]{1,64}$'),
    CONSTRAINT readings_seq_range CHECK (seq >= 0),
    CONSTRAINT readings_kind CHECK (kind IN ('ds18b20', 'dht22', 'cpu', 'simulated', 'legacy')),
    CONSTRAINT readings_temperature_finite
        CHECK (temperature_c > '-infinity' AND temperature_c < 'infinity'),
    CONSTRAINT readings_humidity_range CHECK (humidity_pct BETWEEN 0 AND 100)
);

COMMENT ON TABLE readings IS
    'One row per reading a node took; exactly once, by the natural key (node, sensor, seq).';
COMMENT ON COLUMN readings.seq IS
    'Per-node sequence number (never repeats); for legacy course messages, epoch milliseconds.';
COMMENT ON COLUMN readings.ts IS 'The node''s UTC time of the reading.';
COMMENT ON COLUMN readings.time_uncertain IS
    'The node could not confirm its clock (no NTP sync) when it sent this reading.';
COMMENT ON COLUMN readings.received_at IS 'When the pipeline committed the row.';

-- "One sensor, recent time range": the summary, the dashboards and sensor_latest all ask this.
CREATE INDEX readings_sensor_ts ON readings (node, sensor, ts DESC);
-- Time-range scans across all sensors (the last hour, retention): tiny, append-friendly.
CREATE INDEX readings_ts_brin ON readings USING brin (ts) WITH (pages_per_range = 32);

GRANT USAGE ON SCHEMA public TO tempmon_writer, tempmon_reader;
-- The writer inserts (idempotently) and reads back; it cannot update, delete or truncate.
GRANT SELECT, INSERT ON readings TO tempmon_writer;
GRANT SELECT ON readings TO tempmon_reader;

-- The consumers check the schema version before they start.
GRANT SELECT ON schema_migrations TO tempmon_writer, tempmon_reader;
