"""`teacher.url`: a teacher on another machine, read through dsdistill's own server (server.py) or a vLLM
one (vllm.py), as `teacher.options.api` says."""

from __future__ import annotations

from typing import Any

from dsdistill.teachers.server import ServerOptions, ServerPlan
from dsdistill.teachers.vllm import VllmPlan


class UrlPlan:
    """The kind registered as `url`: opens the plan of the server's API."""

    Options = ServerOptions

    @classmethod
    def open(cls, cfg: Any, student_tokenizer: Any, *, rank: int) -> ServerPlan | VllmPlan:
        options = ServerOptions.model_validate(cfg.teacher.options)
        if options.api == "vllm":
            return VllmPlan(cfg, options, student_tokenizer)
        return ServerPlan(cfg.teacher.url, options, student_tokenizer)
