"""The contract between the edge agent and the pipeline, and nothing else.

Both wings depend on this package; neither imports the other. Standard library only.

- :mod:`tempmon_contract.ids`: node and sensor ids, topics and routing keys;
- :mod:`tempmon_contract.kinds`: the sensor kinds, what each measures and its ranges;
- :mod:`tempmon_contract.wire`: the v1 message encoder and its limits;
- :mod:`tempmon_contract.deadletter`: the dead-letter header names;
- :mod:`tempmon_contract.retry`: the reconnect back-off both wings use.

``gateway/schema/`` holds the published JSON Schema; ``tests/unit/test_contract.py`` holds
this package, the schema, the agent's messages and the pipeline's decoder to each other.
"""

__version__ = "0.1.0"
