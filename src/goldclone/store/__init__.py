"""The store: what the service records, in SQLite or a shared PostgreSQL.

``database`` holds the engine and runs transactions; each aggregate's queries are functions
of a module of its own that take a connection (``vm_records``, ``pool_records``,
``template_records``, ``host_records``, ``handoff_records``, ``delivery_records``,
``leftover_records``, ``checksum_records``, and ``event_log``, the change log that every
change writes to). A change that spans aggregates calls several of them inside one
``Database.write``. ``tables`` is the schema as the queries see it; ``migrations`` makes it."""
