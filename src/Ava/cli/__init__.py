"""The ``ava`` command line (outermost layer: nothing imports it)."""
