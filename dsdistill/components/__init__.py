"""Loss components, one per file, each implementing `base.Component`; registered in `dsdistill/registry.py`."""
