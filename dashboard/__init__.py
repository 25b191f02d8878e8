"""The terminal dashboard: a live, full-screen view of the controller's ClusterStats.

``view`` renders one frame from a ClusterStats (pure, testable); ``app`` polls the controller,
reads keys and drives a rich Live display.
"""

from lmshare.dashboard.app import StatsPoller, print_once, run_dashboard
from lmshare.dashboard.view import ViewState, render

__all__ = ["StatsPoller", "ViewState", "print_once", "render", "run_dashboard"]
