-- The reader role's statement_timeout (set by gateway/postgres/init-roles.sh) is only a role
-- default: any session may SET it higher. This function enforces the limit anyway: it
-- cancels every active query of a tempmon_reader member in this database that has run longer
-- than max_runtime (at least 5 seconds, whatever the caller asks). The consumers call it
-- every few seconds as tempmon_writer, which may run it and nothing more; it runs with the
-- owner's rights (pg_signal_backend and pg_read_all_stats, granted by init-roles.sh).
CREATE FUNCTION cancel_overlong_reader_queries(max_runtime interval DEFAULT interval '60 seconds')
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- PL/pgSQL, not one SQL statement: the planner may evaluate the quals of a WHERE in any
    -- order, and pg_cancel_backend() must run only for the rows that passed every filter.
    target record;
    cancelled integer := 0;
BEGIN
    FOR target IN
        SELECT a.pid
          FROM pg_stat_activity AS a
         WHERE a.datname = current_database()
           AND a.state = 'active'
           AND a.usesysid IS NOT NULL
           AND a.query_start < clock_timestamp() - greatest(max_runtime, interval '5 seconds')
           AND pg_has_role(a.usesysid, 'tempmon_reader', 'MEMBER')
           AND NOT pg_has_role(a.usesysid, 'tempmon_writer', 'MEMBER')
    LOOP
        IF pg_cancel_backend(target.pid) THEN
            cancelled := cancelled + 1;
        END IF;
    END LOOP;
    RETURN cancelled;
END
$$;

REVOKE ALL ON FUNCTION cancel_overlong_reader_queries(interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cancel_overlong_reader_queries(interval) TO tempmon_writer;
