"""The spool on disk: the mechanism under the rules.

* :mod:`.fsutil`: crash-safe file steps relative to directory descriptors;
* :mod:`.layout`: the directory tree, its settings, root resolution and the
  trust checks (shared with fsck);
* :mod:`.codec`: the formats of ``status.json``, ``log`` and the input;
* :mod:`.taskdir`: one task directory, locked for a change;
* :mod:`.registry`: the registered task types;
* :mod:`.servers`: server locks (liveness);
* :mod:`.queue`: the order of ``enqueued/``.

Nothing here decides what a task's next state is; :mod:`spoolq.lifecycle`
holds those rules and :mod:`spoolq.spool` applies them.
"""
