"""Exit statuses, in rsync's spirit (and with rsync's numbers where the meaning matches)."""

OK = 0  # every target is identical to the source
USAGE = 1  # bad options or arguments; nothing was done
SESSION_FAILED = 12  # no target completed (protocol or data-plane failure, every target lost)
INTERRUPTED = 20  # SIGINT / SIGTERM
PARTIAL = 23  # some targets, or some files on some targets, failed; the rest are identical

EPILOG = """\
exit status:
  0   every target is identical to the source
  1   usage error: bad option or argument, nothing done
  12  the session failed: no target was brought up to date
  20  interrupted by a signal
  23  partial: some targets or some files failed (each is reported); the others are identical
"""
