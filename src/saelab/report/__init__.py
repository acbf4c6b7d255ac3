"""`saelab report`: one self-contained HTML page a researcher would rather look at than read.

from saelab.report import build_report
build_report("runs/results.sqlite", "report.html")    # or a run folder

data     read and check a run folder or a results store (partial runs, bad input)
figures  the matplotlib figures (Agg, PNG bytes)
html     the page: inline CSS, embedded images, sortable tables
build    re-evaluate the SAEs, assemble the sections, write the file
"""

from saelab.report.build import SECTION_IDS, ReportResult, build_report
from saelab.report.data import ReportSource, SAEEntry, load_report_source

__all__ = ["SECTION_IDS", "ReportResult", "ReportSource", "SAEEntry", "build_report", "load_report_source"]
