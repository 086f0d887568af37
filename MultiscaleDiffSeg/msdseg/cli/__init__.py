"""The ``msdseg`` command line (``msdseg.cli.main:main``)."""
