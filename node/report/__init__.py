"""``node-agent report``: the study's tables, charts and a recommendation.

Reads the results store's ``runs``, ``epochs`` and ``conversions`` tables with pandas:
``tables`` turns rows into configurations and their figures, ``recommendation`` picks,
``charts`` draws, ``rendering`` writes text, ``command`` is the CLI body.
"""

from node.report.charts import draw_charts
from node.report.command import report
from node.report.recommendation import recommend, recommendation_text
from node.report.rendering import build_tables, to_markdown
from node.report.tables import (
    FIGURES,
    Figure,
    Results,
    bench_table,
    comparison_tables,
    failed_runs,
    format_bytes,
    format_size_table,
    load_results,
    primary_summary,
    summarise,
    summary_tables,
)

__all__ = ["FIGURES", "Figure", "Results", "bench_table", "build_tables", "comparison_tables",
           "draw_charts", "failed_runs", "format_bytes", "format_size_table", "load_results",
           "primary_summary", "recommend", "recommendation_text", "report", "summarise",
           "summary_tables", "to_markdown"]
