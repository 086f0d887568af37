"""``msdseg web``: a browser app to segment, review, edit and save a T1 brain MRI.

Built on trame-slicer (real Slicer MRML and segment editor without Qt), kept out of the core
package so that ``msdseg`` itself never imports Slicer, trame or VTK.

Modules, one job each:

* :mod:`.hosts`    which network addresses the server may bind to (localhost unless asked)
* :mod:`.access`   the WebSocket Origin allow-list and the one-browser lock
* :mod:`.transfer` uploads in slices, per connection, capped, off the event loop
* :mod:`.uploads`  safe upload names, detached-header checks, validation as images
* :mod:`.worker`   the segmentation job in a background thread: progress, cancel, result
* :mod:`.scene`    MRML operations: load a T1, import a result, export aseg labels, overlays
* :mod:`.overlay`  the uncertainty overlay's threshold and colour bar
* :mod:`.views`    names, orientation letters and slice position in the slice views
* :mod:`.readout`  intensity, structure and uncertainty under the mouse
* :mod:`.editor`   the editor panel: grouped segment list, 2-D brush in mm, undo buttons
* :mod:`.erase`    the eraser that restores the result's label
* :mod:`.volume_table` the volumes table's rows (left/right pairs, asymmetry)
* :mod:`.results`  saving a result under a free name, downloads, reading one back
* :mod:`.session`  what is loaded now (input, result nodes, uncertainty, reference labels)
* :mod:`.widgets`  small trame widgets (upload and download buttons)
* :mod:`.panels`   the side panels (segmentation, volumes table)
* :mod:`.ui`       the page layout
* :mod:`.module`   the page's own JavaScript
* :mod:`.app`      the application: wires state, MRML, the worker and the UI together
* :mod:`.test_hook` a read-only JSON view of the server state for the browser test
* :mod:`.server`   ``msdseg web`` entry point

Only :mod:`.hosts` is imported by the CLI before the heavy imports, so a refused ``--host`` fails
in milliseconds.
"""
