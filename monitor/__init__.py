"""dsmonitor: a terminal dashboard for dsdistill's metrics stream."""
