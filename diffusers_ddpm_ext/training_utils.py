"""Removed: its parts live in :mod:`.rundir`, :mod:`.checkpoints`, :mod:`.trainer`, :mod:`.build`,
:mod:`.processes`, :mod:`.publish` and :mod:`.viz`. Only the name ``hub.load_pipeline`` still imports from here
is kept, until it imports it from :mod:`.rundir`."""

from .rundir import PUBLISH_JOURNAL_NAME  # noqa: F401
