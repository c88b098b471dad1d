"""A minimal stand-in for `vllm serve MODEL --max-logprobs K`, written from vLLM's documented
OpenAI-compatible API: `GET /v1/models`, `POST /tokenize` and `POST /v1/completions` with a token-id prompt
(or a list of them) and `prompt_logprobs`. It runs the model with transformers on the CPU, so the client's
vLLM path is exercised without a GPU or vLLM itself.

    python tests/vllm_standin.py MODEL_DIR PORT [--name NAME] [--max-logprobs K]

Reply shape of a completion (what vLLM sends): {"id", "object": "text_completion", "model", "choices":
[{"index", "text", "finish_reason", "logprobs": null, "prompt_logprobs": [null, {token_id: {"logprob",
"rank", "decoded_token"}, ...}, ...]}], "usage"}; entry i holds the K most likely tokens given the
tokens before i, and prompt token i itself with its rank (1 = most likely)."""

from __future__ import annotations

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("port", type=int)
    ap.add_argument("--name", default="teacher")
    ap.add_argument("--max-logprobs", type=int, default=20)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    max_len = model.config.max_position_embeddings

    def entries(ids: list[int], k: int) -> list:
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
        out: list = [None]
        for i in range(1, len(ids)):
            lp = logp[i - 1]
            top = lp.topk(k)
            entry = {}
            for r, (t, v) in enumerate(zip(top.indices.tolist(), top.values.tolist()), start=1):
                entry[str(t)] = {"logprob": v, "rank": r, "decoded_token": tok.decode([t])}
            own = ids[i]
            if str(own) not in entry:
                entry[str(own)] = {
                    "logprob": float(lp[own]),
                    "rank": int((lp > lp[own]).sum()) + 1,
                    "decoded_token": tok.decode([own]),
                }
            out.append(entry)
        return out

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a) -> None:
            pass

        def reply(self, code: int, body) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/v1/models":
                self.reply(200, {"object": "list", "data": [{"id": args.name, "object": "model", "max_model_len": max_len}]})
            else:
                self.reply(404, {"error": {"message": "not found"}})

        def do_POST(self) -> None:
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if req.get("model") != args.name:
                self.reply(404, {"error": {"message": f"The model `{req.get('model')}` does not exist."}})
            elif self.path == "/tokenize":
                ids = tok(req["prompt"], add_special_tokens=req.get("add_special_tokens", True))["input_ids"]
                self.reply(200, {"tokens": ids, "count": len(ids), "max_model_len": max_len})
            elif self.path == "/v1/completions":
                k = int(req.get("prompt_logprobs") or 0)
                if k > args.max_logprobs:
                    self.reply(
                        400,
                        {
                            "error": {
                                "message": f"Requested prompt logprobs of {k}, which is greater than max allowed: {args.max_logprobs}"
                            }
                        },
                    )
                    return
                prompts = req["prompt"] if isinstance(req["prompt"][0], list) else [req["prompt"]]
                choices = [
                    {"index": i, "text": "", "finish_reason": "length", "logprobs": None, "prompt_logprobs": entries(p, k)}
                    for i, p in enumerate(prompts)
                ]
                n = sum(len(p) for p in prompts)
                self.reply(
                    200,
                    {
                        "id": "cmpl-standin",
                        "object": "text_completion",
                        "model": args.name,
                        "choices": choices,
                        "usage": {"prompt_tokens": n, "completion_tokens": len(prompts), "total_tokens": n + len(prompts)},
                    },
                )
            else:
                self.reply(404, {"error": {"message": "not found"}})

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"vllm stand-in: {args.name} on http://127.0.0.1:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
