"""Local mode: an embedded SQLite store, written in batches by one background writer per process.

`LocalStore` is the sink (it queues records and its writer commits them) and the usage source (it
reads the dashboard's figures); `StorageUnavailable` is what it raises when it cannot take a record.
These two are the package's interface to the rest of the service. Its files, in the order a
record passes through them:

* ``store``: LocalStore: start and close, the queue's front door (track_*), health, reads.
* ``record_queue``: the bounded queue to the writer; each event goes to the journal (``journal.py``) first.
* ``writer``: the writer thread of one start(): batches, one transaction each, fault recovery.
* ``rows``: how records become table rows (each kind's INSERT parameters, UTC days).
* ``schema``: the tables, the triggers that keep the daily rollups, migrations.
* ``connection``: opening the file; what SQLite's errors and the file's identity say.
* ``pending``: what close() could not write, saved beside the database and imported at start.
* ``space``: the free-space watermark and the reserve file.
* ``maintenance``: retention, the size cap, compaction of closed days, salvage of a corrupt file.
* ``queries``: the dashboard's reads, from the rollups or the raw rows.
"""
from local_store.store import LocalStore
from local_store.record_queue import StorageUnavailable

__all__ = ["LocalStore", "StorageUnavailable"]
