"""The batch-job shell shared by ``segment``, ``predict`` and the demo: inputs and names
(`.shell`), the one record schema and its CSV/JSON files (`.records`), and
sharding over processes and machines (`.shard`)."""
