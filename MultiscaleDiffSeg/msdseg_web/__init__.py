"""``msdseg web``: a browser app to segment, review, edit and save a T1 brain MRI.

Built on trame-slicer (real Slicer MRML and segment editor without Qt), kept out of the core
package so that ``msdseg`` itself never imports Slicer, trame or VTK.

Modules, one job each:

* :mod:`.hosts`    which network addresses the server may bind to (localhost unless asked)
* :mod:`.uploads`  writing browser uploads to disk safely and validating them as images
* :mod:`.worker`   the segmentation job in a background thread: progress, cancel, result
* :mod:`.scene`    MRML operations: load a T1, import a result, export aseg labels, overlays
* :mod:`.results`  saving a result in the output contract and reading one back
* :mod:`.session`  what is loaded now (input, result nodes, uncertainty)
* :mod:`.widgets`  small trame widgets (upload and download buttons)
* :mod:`.panels`   the side panels (segmentation, volumes table)
* :mod:`.ui`       the page layout
* :mod:`.app`      the application: wires state, MRML, the worker and the UI together
* :mod:`.test_hook` a read-only JSON view of the server state for the browser test
* :mod:`.server`   ``msdseg web`` entry point

Only :mod:`.hosts` is imported by the CLI before the heavy imports, so a refused ``--host`` fails
in milliseconds.
"""
