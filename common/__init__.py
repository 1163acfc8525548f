"""Shared helpers of the SegGen stages: colour maps, dataset readers, manifests, tiny models."""


class SegGenError(Exception):
    """A bad input the user can fix. The message names the flag or file and the fix; scripts
    print it without a traceback and exit with status 2."""
