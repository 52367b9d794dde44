-- 0005: the MQTT connection a node's status belongs to, so that status never goes backwards.
--
-- An agent's Last Will (`offline`) and its reconnect's `online` can reach the database in
-- either order: two consumer replicas commit them independently, and RabbitMQ publishes the
-- old connection's Last Will only when the new connection takes its client id over. Agents now
-- send `session` (gateway/schema/status.v1.schema.json: 16 lowercase hex digits, one per MQTT
-- connection, in its Last Will and in every status it sends), and the pipeline's upsert
-- applies an `offline` only to the connection it belongs to, and never lets a late `online`
-- of a connection undo that connection's `offline`. Rows of older agents keep a NULL session
-- and are updated as before.
--
-- No default and no rewrite: adding the column only changes the catalog, and the CHECK scans
-- a table of one row per node. The table-level grants of 0002 (tempmon_writer: SELECT,
-- INSERT, UPDATE; tempmon_reader: SELECT) cover the new column; views made before it do not
-- show it.

ALTER TABLE nodes ADD COLUMN session text;
ALTER TABLE nodes ADD CONSTRAINT nodes_session CHECK (session ~ '^[0-9a-f]{16}$');

COMMENT ON COLUMN nodes.session IS
    'The MQTT connection (agent-chosen id, 16 hex digits) of the stored status; NULL from'
    ' agents that send none. An offline of another connection does not apply.';
