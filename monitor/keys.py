"""Every key of the dashboard: its binding (what the key bar shows, in order of use) and its help line."""

from __future__ import annotations

from textual.binding import Binding

COMPACT_SIZE = (100, 30)
"""Below this terminal size one view at a time fills the screen."""

BINDINGS = [
    Binding("q", "quit", "quit"),
    Binding("question_mark", "help", "help"),
    Binding("v", "next_view", "view"),
    Binding("p", "pause", "pause"),
    Binding("slash", "filter", "filter"),
    Binding("r", "toggle_weighted", "raw/weighted"),
    Binding("e", "export", "SVG"),
    Binding("l", "toggle_log", "log-y"),
    Binding("s", "smooth(1)", "smooth+"),
    Binding("S", "smooth(-1)", "smooth-"),
    Binding("x", "cycle_x", "x-axis"),
    Binding("n", "cycle_window", "window"),
    Binding("b", "cycle_baseline", "baseline"),
    Binding("o", "toggle_robust", "outliers"),
    Binding("m", "maximise", "maximise plot", show=False),
    Binding("plus,equals_sign", "zoom(0.5)", "zoom+", show=False),
    Binding("minus", "zoom(2.0)", "zoom-", show=False),
    Binding("less_than_sign,comma", "pan(-1)", "pan left", show=False),
    Binding("greater_than_sign,full_stop", "pan(1)", "pan right", show=False),
    Binding("0", "reset_zoom", "reset zoom", show=False),
    Binding("left_square_bracket", "cursor(-1)", "cursor left", show=False),
    Binding("right_square_bracket", "cursor(1)", "cursor right", show=False),
    Binding("c", "hide_cursor", "hide cursor", show=False),
    Binding("E", "export_csv", "CSV", show=False),
    Binding("i", "show_config", "config", show=False),
    Binding("j", "show_records", "records", show=False),
    Binding("g", "show_samples", "samples", show=False),
    Binding("tab", "focus_next", "next panel", show=False),
    Binding("shift+tab", "focus_previous", "prev panel", show=False),
]
KEY_HELP = [
    ("q", "quit"),
    ("?", "this help"),
    ("p", "pause / follow (records keep being read while paused)"),
    ("l", "log-y on/off"),
    ("s / S", "more / less smoothing (debiased EMA)"),
    ("x", "x-axis: step, wall time, tokens"),
    ("r", "raw / weighted components"),
    ("n", "window: all or the last N points"),
    ("/", "filter metrics by glob, e.g. kd,routing_*"),
    ("b", "next run as the pinned baseline"),
    ("e", "export an SVG screenshot (to --export-dir or the current directory)"),
    ("v", f"one view alone, next view (below {COMPACT_SIZE[0]}x{COMPACT_SIZE[1]} one view is always alone)"),
    ("o", "y range ignores outliers (2nd-98th percentile) on/off"),
    ("m", "the focused plot (tab to it) fills the screen; m again brings the others back"),
    ("+ / -", "zoom in / out on x (about the crosshair, else the newest end)"),
    ("< / >", "pan left / right; 0 resets the zoom"),
    ("[ / ]", "crosshair one record left / right: every plot reads its value there; c hides it"),
    ("E", "export every series as CSV (to --export-dir or the current directory)"),
    ("i", "the run's resolved config, searchable"),
    ("j", "the newest raw records, searchable"),
    ("g", "on-policy runs: the student's completions of held-out prompts at each eval, with the teacher's score"),
    ("tab", "next / previous panel (shift+tab)"),
]
