"""Reports on runs: terminal tables now; HTML reports and a dashboard later."""

from veil.report.console import ProgressDisplay, print_result, rounds_table, summary_table

__all__ = ["ProgressDisplay", "print_result", "rounds_table", "summary_table"]
