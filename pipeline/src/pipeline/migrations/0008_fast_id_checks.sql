-- 0008: the id CHECKs say the same thing in a form PostgreSQL checks ten times faster.
--
-- '^[A-Za-z0-9_-]{1,64}$' makes PostgreSQL's regex engine unroll the bounded repeat into 64
-- states and walk them for every row: about 3 us per value on a 2-core machine, twice per
-- reading (node and sensor), which was a fifth of the database's CPU per stored reading
-- (bench/RESULTS.md, issue 17: `python -m bench.statement`). An unbounded class and a length
-- test admit exactly the same values (the class is ASCII, so bytes are characters) at about
-- 0.3 us. tempmon_contract.ids holds both halves (ID_CHARS, ID_MAX), and
-- tests/system/test_contract_sql.py holds these constraints to them.
--
-- Cheap on a big table, as 0007: the constraints are replaced in the catalog only. Every
-- stored row satisfied the old ones, which admit the same values, so the new ones are added
-- NOT VALID on readings (proving it again would scan every partition under readings' ACCESS
-- EXCLUSIVE lock); partitions made from now on get them as valid ones. nodes is one row per
-- Pi and is checked at once.

-- readings: the parent's DROP also drops each partition's inherited copy, except where the
-- partition has the constraint of its own (readings_legacy, the table as it was before 0006).
ALTER TABLE readings DROP CONSTRAINT readings_node_id, DROP CONSTRAINT readings_sensor_id;
DO $$
DECLARE
    part regclass;
    name text;
BEGIN
    FOR part, name IN SELECT c.conrelid::regclass, c.conname
                        FROM pg_constraint AS c
                        JOIN pg_inherits AS i ON i.inhrelid = c.conrelid
                       WHERE i.inhparent = 'readings'::regclass
                         AND c.conname IN ('readings_node_id', 'readings_sensor_id')
    LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', part, name);
    END LOOP;
END
$$;

ALTER TABLE readings
    ADD CONSTRAINT readings_node_id
        CHECK (node ~ '^[A-Za-z0-9_-]+$' AND octet_length(node) <= 64) NOT VALID,
    ADD CONSTRAINT readings_sensor_id
        CHECK (sensor ~ '^[A-Za-z0-9_-]+$' AND octet_length(sensor) <= 64) NOT VALID;

ALTER TABLE nodes
    DROP CONSTRAINT nodes_node_id,
    ADD CONSTRAINT nodes_node_id
        CHECK (node ~ '^[A-Za-z0-9_-]+$' AND octet_length(node) <= 64);
