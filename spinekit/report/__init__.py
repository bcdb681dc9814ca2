"""Reports: self-contained HTML (figures embedded), tables and figures.

``spinekit.report.html.render_bmd_report(result, image)`` -> HTML text for a BMDResult;
``spinekit.report.figures`` makes the PNGs (matplotlib Agg). Imports stay lazy: importing this
package does not import matplotlib.
"""
