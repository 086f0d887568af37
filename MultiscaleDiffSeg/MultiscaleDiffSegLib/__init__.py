"""Qt-free parts of the MultiscaleDiffSeg Slicer module: all of its logic.

* :mod:`.settings`     presets, devices, the worker command line, time estimates
* :mod:`.process`      the worker process: progress streaming and process-tree cancel
* :mod:`.dependencies` what to install and how (decisions only; Slicer does the installing)
* :mod:`.terminology`  loads the module's own terminology context (every segment's codes)
* :mod:`.mrml`         results -> segmentation node, terminology, subject hierarchy, tables
* :mod:`.visibility`   hemisphere folders' eye icons -> segments, in every watched scene
* :mod:`.jobs`         one volume or a cohort from start to result
* :mod:`.logic`        the module's logic (console API), with the application injected as a host
* :mod:`.selftest`     the steps of the module's self-test and the sample T1

:mod:`.mrml`, :mod:`.visibility`, :mod:`.jobs`, :mod:`.logic` and :mod:`.selftest` need ``slicer``
(MRML classes, no Qt; ``slicer-core`` is enough); the others need only the Python standard library
and ``packaging``, so they are importable anywhere.
"""

#: Submodules in an order where each comes after the ones it imports: the module widget's
#: developer reload re-imports them in this order (names not imported yet are skipped).
RELOAD_ORDER = ("settings", "process", "dependencies", "terminology", "mrml", "visibility", "jobs", "logic",
                "selftest")
