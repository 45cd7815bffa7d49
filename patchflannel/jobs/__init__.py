"""The batch-job shell shared by ``segment``, ``predict`` and the demo: inputs and names
(:mod:`.shell`), the one record schema and its CSV/JSON files (:mod:`.records`), and
sharding over processes and machines (:mod:`.shard`)."""
