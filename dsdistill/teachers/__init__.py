"""Teachers: every kind of frozen teacher behind one interface (base.py). `build.open_teacher` opens the one a
config names; the run asks its capabilities, never its kind."""
