"""Qt-free parts of the MultiscaleDiffSeg Slicer module.

* :mod:`.settings`     presets, devices, the worker command line, time estimates
* :mod:`.process`      the worker process: progress streaming and process-tree cancel
* :mod:`.dependencies` what to install and how (decisions only; Slicer does the installing)
* :mod:`.mrml`         results -> segmentation node, terminology, subject hierarchy, tables
* :mod:`.jobs`         one volume or a cohort from start to result

Only :mod:`.mrml` and :mod:`.jobs` need ``slicer`` (MRML classes, no Qt); the others need only the
Python standard library and ``packaging``, so they are importable anywhere.
"""
